//! Tokenizers: raw bytes, characters (vocabulary from the corpus), or BPE trained with the
//! Hugging Face `tokenizers` crate (or loaded from any `tokenizer.json`).

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer, TokenizerBuilder};

/// What `--tokenizer` asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSpec {
    Byte,
    Char,
    /// Train a byte-level BPE with this vocabulary size.
    Bpe(usize),
    /// Load an existing `tokenizer.json`.
    File(std::path::PathBuf),
}

impl std::str::FromStr for TokenizerSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "byte" => Self::Byte,
            "char" => Self::Char,
            _ if s.starts_with("bpe:") => {
                let n: usize = s[4..].parse().map_err(|_| {
                    anyhow!("--tokenizer {s}: expected bpe:N with N a vocabulary size")
                })?;
                if n < 257 {
                    bail!("--tokenizer {s}: a byte-level BPE needs a vocabulary of at least 257");
                }
                Self::Bpe(n)
            }
            _ if s.ends_with(".json") => Self::File(s.into()),
            _ => bail!("--tokenizer {s}: expected byte, char, bpe:N or a tokenizer.json path"),
        })
    }
}

/// A tokenizer nuwa can save beside its shards and load back for sampling.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    Byte,
    /// Sorted characters; id = index.
    Char(Vec<char>),
    Hf(Box<HfTokenizer>),
}

/// Turns generated token ids into text as they arrive. Decoding token by token loses the
/// spaces some decoders put between tokens (SentencePiece, word-level) and splits multi-byte
/// characters; decoding everything each time costs O(n²). This decodes a short window instead:
/// the tokens since the last piece of text it returned, with the one before as context.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// End of what has been returned.
    read: usize,
}

impl TextStream {
    /// Adds a token; returns the new text it completes (empty while a character is partial).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        self.next_text(tokenizer, false)
    }

    /// Whatever is still held back, at the end of generation.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        self.next_text(tokenizer, true)
    }

    fn next_text(&mut self, tokenizer: &Tokenizer, last: bool) -> String {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read]);
        let now = tokenizer.decode(&self.ids[self.prefix..]);
        let complete = last || !now.ends_with('\u{FFFD}');
        if complete && now.len() > before.len() && now.is_char_boundary(before.len()) {
            let text = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            text
        } else {
            String::new()
        }
    }
}

/// The small JSON form of byte/char tokenizers (`tokenizer.nuwa.json`).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum SavedTokenizer {
    Byte,
    Char { chars: String },
}

pub const NUWA_TOKENIZER_FILE: &str = "tokenizer.nuwa.json";
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

impl Tokenizer {
    /// Builds the tokenizer a spec asks for, training it on `texts` where needed.
    pub fn build(spec: &TokenizerSpec, texts: &[String]) -> Result<Self> {
        Ok(match spec {
            TokenizerSpec::Byte => Self::Byte,
            TokenizerSpec::Char => {
                let mut chars: Vec<char> = texts.iter().flat_map(|t| t.chars()).collect();
                chars.sort_unstable();
                chars.dedup();
                Self::Char(chars)
            }
            TokenizerSpec::Bpe(vocab) => Self::Hf(Box::new(train_bpe(*vocab, texts)?)),
            TokenizerSpec::File(path) => {
                Self::Hf(Box::new(HfTokenizer::from_file(path).map_err(|e| {
                    anyhow!("{}: not a usable tokenizer.json: {e}", path.display())
                })?))
            }
        })
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte => 256,
            Self::Char(chars) => chars.len(),
            Self::Hf(t) => t.get_vocab_size(true),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Char(chars) => text
                .chars()
                .map(|c| {
                    chars.binary_search(&c).map(|i| i as u32).map_err(|_| {
                        anyhow!("character {c:?} is not in the tokenizer's vocabulary")
                    })
                })
                .collect(),
            Self::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow!("tokenizer: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Like [`Self::encode`], adding the special tokens an HF tokenizer's post-processor puts
    /// around a text (a BOS, say), as a prompt to a pretrained model expects.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Hf(t) => Ok(t
                .encode(text, true)
                .map_err(|e| anyhow!("tokenizer: {e}"))?
                .get_ids()
                .to_vec()),
            _ => self.encode(text),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Self::Char(chars) => ids
                .iter()
                .map(|&i| chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
                .collect(),
            Self::Hf(t) => t.decode(ids, false).unwrap_or_default(),
        }
    }

    /// The tokenizer as a `tokenizer.json` that Hugging Face `tokenizers` / transformers load
    /// and that encodes every text to the same ids: a BPE without merges over the characters
    /// (char) or over the 256 byte-level symbols (byte, GPT-2's byte-to-character table).
    pub fn hf_json(&self) -> Result<String> {
        let tokenizer = match self {
            Self::Hf(t) => return t.to_string(false).map_err(|e| anyhow!("tokenizer: {e}")),
            Self::Char(chars) => {
                let vocab: Vec<(String, u32)> = chars
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.to_string(), i as u32))
                    .collect();
                let mut t = HfTokenizer::new(merge_free_bpe(vocab)?);
                // Tokens are whole characters: joined back as they are.
                t.with_decoder(Some(Fuse::new()));
                t
            }
            Self::Byte => {
                let vocab: Vec<(String, u32)> = (0..=255u8)
                    .map(|b| (byte_symbol(b).to_string(), u32::from(b)))
                    .collect();
                let mut t = HfTokenizer::new(merge_free_bpe(vocab)?);
                // One "word" per text (no regex split), bytes mapped to symbols and back.
                t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
                t.with_decoder(Some(ByteLevel::new(false, false, false)));
                t
            }
        };
        tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// One token's bytes (a byte tokenizer's token may be part of a UTF-8 character).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            Self::Byte => vec![id.min(255) as u8],
            _ => self.decode(&[id]).into_bytes(),
        }
    }

    /// The id of the first of `names` that is one of the tokenizer's tokens (HF tokenizers).
    pub fn special_token_id(&self, names: &[&str]) -> Option<u32> {
        match self {
            Self::Hf(t) => names.iter().find_map(|n| t.token_to_id(n)),
            _ => None,
        }
    }

    /// Writes the tokenizer into `dir` (`tokenizer.json` for HF tokenizers).
    pub fn save(&self, dir: &Path) -> Result<()> {
        match self {
            Self::Hf(t) => t
                .save(dir.join(HF_TOKENIZER_FILE), false)
                .map_err(|e| anyhow!("writing {}: {e}", dir.join(HF_TOKENIZER_FILE).display())),
            Self::Byte | Self::Char(_) => {
                let saved = match self {
                    Self::Char(chars) => SavedTokenizer::Char {
                        chars: chars.iter().collect(),
                    },
                    _ => SavedTokenizer::Byte,
                };
                nuwa_core::atomic_write(
                    &dir.join(NUWA_TOKENIZER_FILE),
                    serde_json::to_string(&saved)?.as_bytes(),
                )
            }
        }
    }

    /// Loads the tokenizer saved in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let nuwa = dir.join(NUWA_TOKENIZER_FILE);
        let hf = dir.join(HF_TOKENIZER_FILE);
        if nuwa.exists() {
            let text = std::fs::read_to_string(&nuwa)
                .with_context(|| format!("reading {}", nuwa.display()))?;
            let saved: SavedTokenizer = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: garbled tokenizer file: {e}", nuwa.display()))?;
            Ok(match saved {
                SavedTokenizer::Byte => Self::Byte,
                SavedTokenizer::Char { chars } => Self::Char(chars.chars().collect()),
            })
        } else if hf.exists() {
            Self::build(&TokenizerSpec::File(hf), &[])
        } else {
            bail!(
                "{}: no tokenizer found (expected {NUWA_TOKENIZER_FILE} or {HF_TOKENIZER_FILE})",
                dir.display()
            )
        }
    }
}

fn merge_free_bpe(vocab: Vec<(String, u32)>) -> Result<BPE> {
    BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            vec![],
        )
        .build()
        .map_err(|e| anyhow!("building tokenizer.json: {e}"))
}

/// GPT-2's printable stand-in for a byte (what the ByteLevel pre-tokenizer maps bytes to):
/// printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order.
fn byte_symbol(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

fn train_bpe(vocab_size: usize, texts: &[String]) -> Result<HfTokenizer> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .show_progress(false)
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
    .with_decoder(Some(ByteLevel::new(false, true, true)))
    .build()
    .map_err(|e| anyhow!("building BPE tokenizer: {e}"))?;
    let dir = tempfile_dir()?;
    let mut files = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let path = dir.join(format!("part{i}.txt"));
        std::fs::write(&path, text)?;
        files.push(path.to_string_lossy().into_owned());
    }
    tokenizer
        .train_from_files(&mut trainer, files)
        .map_err(|e| anyhow!("training BPE tokenizer: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(tokenizer.into())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("nuwa-bpe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_matches_whole_decoding_and_never_splits_characters() {
        let t = Tokenizer::Byte;
        let ids = t.encode("héllo, 世界!").unwrap();
        let mut stream = TextStream::default();
        let mut pieces: Vec<String> = ids.iter().map(|&id| stream.push(&t, id)).collect();
        pieces.push(stream.finish(&t));
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), "héllo, 世界!");
        // The three bytes of 世 come out as one piece, with the third.
        assert!(pieces.contains(&"世".to_string()), "{pieces:?}");
    }

    #[test]
    fn char_round_trip() {
        let t = Tokenizer::build(&TokenizerSpec::Char, &["hello world".into()]).unwrap();
        assert_eq!(t.vocab_size(), 8);
        let ids = t.encode("hello").unwrap();
        assert_eq!(t.decode(&ids), "hello");
        assert!(t.encode("z").is_err());
    }

    #[test]
    fn bpe_trains_and_round_trips() {
        let text = "the cat sat on the mat. the cat ate the rat. ".repeat(50);
        let t = Tokenizer::build(&TokenizerSpec::Bpe(300), std::slice::from_ref(&text)).unwrap();
        assert!(t.vocab_size() > 257 && t.vocab_size() <= 300);
        let ids = t.encode("the cat sat").unwrap();
        assert!(ids.len() < "the cat sat".len(), "BPE should merge: {ids:?}");
        assert_eq!(t.decode(&ids), "the cat sat");
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(
            "bpe:512".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::Bpe(512)
        );
        assert!("bpe:x".parse::<TokenizerSpec>().is_err());
        assert!("wat".parse::<TokenizerSpec>().is_err());
    }

    #[test]
    fn char_and_byte_tokenizers_export_as_tokenizer_json_with_the_same_ids() {
        let text = "First Citizen:\nBefore we proceed, hear me speak — ünïcode ok?";
        let chars: Vec<char> = {
            let mut c: Vec<char> = text.chars().collect();
            c.sort_unstable();
            c.dedup();
            c
        };
        for tokenizer in [Tokenizer::Char(chars), Tokenizer::Byte] {
            let json = tokenizer.hf_json().unwrap();
            let hf: HfTokenizer = json.parse().unwrap();
            let ids = hf.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ids, tokenizer.encode(text).unwrap());
            assert_eq!(hf.decode(&ids, false).unwrap(), text);
            assert_eq!(hf.get_vocab_size(true), tokenizer.vocab_size());
        }
    }
}
