//! Codec hot path: decode one request, build its `Query`, encode one answer.
//!
//! Each iteration works on a buffer that already holds the request, as a connection
//! task does after a read; socket I/O is not part of it.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mxpace::classify::{Blamed, Class};
use mxpace::protocol::{Answer, Codec, Limits, Protocol, Reply};
use tokio_util::codec::{Decoder, Encoder};

const POSTFIX_POLICY: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=127.0.0.1\nclient_name=localhost\nclient_port=45678\nreverse_client_name=localhost\nserver_address=127.0.0.1\nserver_port=10025\nhelo_name=client.test\nsender=alice@sender.test\nrecipient=bob@example.com\nrecipient_count=0\nqueue_id=\ninstance=1a2b.65f0c1d2.3e4f5.0\nsize=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=\nencryption_cipher=\nencryption_keysize=0\npolicy_context=\ncompatibility_level=3.6\nmail_version=3.7.11\n\n";

const STATUS_KEY: &str = "status/gmail/t3 4.7.28 host gmail-smtp-in.l.google.com[142.250.1.27] said: 421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later. (in reply to RCPT TO command)";

const JSON_REPORT: &[u8] = b"{\"request\":\"delivery_report\",\"recipient\":\"user@gmail.com\",\"sender\":\"alice@sender.test\",\"mx_host\":\"gmail-smtp-in.l.google.com\",\"mx_ip\":\"142.250.1.27\",\"source_ip\":\"192.0.2.10\",\"status\":\"4.7.28\",\"reply\":\"421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later.\"}\n";

fn round_trip(c: &mut Criterion) {
    let status = format!("{}:{STATUS_KEY},", STATUS_KEY.len());
    let cases: [(&str, Protocol, &[u8]); 3] = [
        (
            "policy_smtpd_access_policy",
            Protocol::Policy,
            POSTFIX_POLICY,
        ),
        ("socketmap_status", Protocol::Socketmap, status.as_bytes()),
        ("jsonl_delivery_report", Protocol::JsonLines, JSON_REPORT),
    ];
    let answer = Answer {
        reply: Reply::Action("DEFER"),
        class: Some(Class::RateLimited),
        provider: Some("gmail"),
        blamed: Some(Blamed::Ip),
        stage: Some("hesitating"),
        retry_after: Some(37),
        concurrency: Some(2),
        rate: Some(0.5),
    };
    let mut group = c.benchmark_group("protocol");
    group.throughput(Throughput::Elements(1));
    for (name, protocol, wire) in cases {
        let mut codec = Codec::new(protocol, &Limits::default());
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = BytesMut::with_capacity(4096);
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.extend_from_slice(wire);
                let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
                let request = frame.parse().unwrap();
                let query = request.query();
                black_box(query.recipient_domain());
                black_box(query.reply);
                codec.encode(&answer, &mut out).unwrap();
                out.clear();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
