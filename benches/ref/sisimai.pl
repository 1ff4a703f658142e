#!/usr/bin/perl
# Sisimai's per-text reason matcher (Sisimai->match) over the same reply texts as
# benches/classify.rs: the seed replies and the corpus, one thread, whole passes for at
# least SECONDS (default 3). Prints one line: replies/s, ns/reply, and Sisimai's version.
use strict;
use warnings;
use Sisimai;
use Time::HiRes qw(time);

my $data = shift // die "usage: sisimai.pl DATA_DIR [SECONDS]\n";
my $secs = shift // 3;
my @replies;
open(my $c, '<', "$data/corpus/dev.tsv") or die "$data/corpus/dev.tsv: $!\n";
<$c>;    # header
while (<$c>) { chomp; my ($r) = split /\t/; push @replies, $r if defined $r && length $r }
close $c;
open(my $s, '<', "$data/seed-replies.tsv") or die "$data/seed-replies.tsv: $!\n";
while (<$s>) { chomp; next if /^#/ || !length; my ($r) = split /\t/; push @replies, $r }
close $s;

# Warm up: loads every Sisimai::Reason::* module the matcher requires lazily.
my %reasons;
$reasons{ Sisimai->match($_) || 'undef' }++ for @replies;

my ($n, $t0) = (0, time);
while (time - $t0 < $secs) {
    Sisimai->match($_) for @replies;
    $n += @replies;
}
my $el = time - $t0;
printf "sisimai: %.0f replies/s, %.0f ns/reply (%d replies, %d distinct, one thread, Sisimai %s, reasons: %d kinds)\n",
    $n / $el, $el * 1e9 / $n, $n, scalar @replies, $Sisimai::VERSION, scalar keys %reasons;
