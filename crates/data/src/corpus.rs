//! The built-in corpus: text the program generates itself, so `nuwa train` works on a fresh
//! machine with no download. It is a few hundred kilobytes of short English sentences from a
//! small grammar, interleaved with addition facts, so a model has both word statistics and an
//! exact rule to learn.

use nuwa_core::rng::splitmix64;

const SUBJECTS: &[&str] = &[
    "the cat",
    "the old dog",
    "a small bird",
    "the farmer",
    "my sister",
    "the king",
    "a young fox",
    "the teacher",
    "our neighbour",
    "the river",
    "a tired horse",
    "the miller",
];
const VERBS: &[&str] = &[
    "sees",
    "follows",
    "likes",
    "finds",
    "carries",
    "watches",
    "remembers",
    "greets",
    "fears",
    "helps",
    "calls",
    "paints",
];
const OBJECTS: &[&str] = &[
    "the red apple",
    "a quiet house",
    "the green hill",
    "a wooden boat",
    "the morning sun",
    "an empty cup",
    "the long road",
    "a silver coin",
    "the north wind",
    "a warm loaf",
];
const PLACES: &[&str] = &[
    "in the garden",
    "by the sea",
    "at dawn",
    "under the bridge",
    "near the market",
    "after the rain",
    "in the winter",
    "on the hill",
];

/// Deterministic generator state.
struct Rng(u64);

impl Rng {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        self.0 = splitmix64(self.0);
        items[(self.0 % items.len() as u64) as usize]
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 = splitmix64(self.0);
        self.0 % n
    }
}

/// Generates the built-in corpus: about `bytes` bytes of text, the same every time.
pub fn builtin_corpus(bytes: usize) -> String {
    let mut rng = Rng(2024);
    let mut text = String::with_capacity(bytes + 128);
    while text.len() < bytes {
        if rng.below(4) == 0 {
            let (a, b) = (rng.below(50), rng.below(50));
            text.push_str(&format!("{a} plus {b} is {}.\n", a + b));
        } else {
            let s = rng.pick(SUBJECTS);
            let v = rng.pick(VERBS);
            let o = rng.pick(OBJECTS);
            let p = rng.pick(PLACES);
            text.push_str(&format!("{s} {v} {o} {p}.\n"));
        }
    }
    text
}

pub const BUILTIN_BYTES: usize = 400_000;

#[cfg(test)]
mod tests {
    #[test]
    fn corpus_is_deterministic_and_sized() {
        let a = super::builtin_corpus(10_000);
        assert_eq!(a, super::builtin_corpus(10_000));
        assert!(a.len() >= 10_000 && a.len() < 10_200);
        assert!(a.contains(" plus ") && a.contains("the "));
    }
}
