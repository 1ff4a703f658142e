//! The replies of the shared data (corpus diagnostics, then seed replies), for the tests
//! and benchmarks that run the classifier over all of them. Include it with
//! `#[path = "…/replies.rs"] mod replies;`.

const CORPUS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/corpus/dev.tsv"
));
const SEED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/seed-replies.tsv"
));

/// Every non-empty reply text of the corpus and the seed file, in file order.
pub fn all() -> Vec<&'static str> {
    let corpus = CORPUS.lines().skip(1);
    let seed = SEED.lines().filter(|l| !l.starts_with('#'));
    corpus
        .chain(seed)
        .filter_map(|l| l.split('\t').next())
        .filter(|r| !r.is_empty())
        .collect()
}
