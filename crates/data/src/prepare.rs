//! `nuwa data prepare`: read text, build or train a tokenizer, tokenize in parallel, write
//! train/val shards and the manifest.

use crate::shards::{write_shard, Manifest, TokenDtype, FORMAT, MANIFEST_FILE};
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Where the text comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Files, or folders searched recursively for files.
    Paths(Vec<PathBuf>),
    /// The generated built-in corpus.
    Builtin,
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub source: Source,
    pub tokenizer: TokenizerSpec,
    pub out_dir: PathBuf,
    /// Fraction of tokens held out for validation (taken from the end).
    pub val_fraction: f64,
    /// Replace what `out_dir` already holds (a run trained on it then refuses to resume).
    pub force: bool,
}

/// Refuses to write into a folder that already holds prepared data or anything else, unless
/// forced: re-preparing the data of a run changes what its resume trains on.
fn refuse_prepared_folder(dir: &Path, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(_) => return Ok(()),
    };
    if dir.join(MANIFEST_FILE).exists() {
        bail!(
            "{}: already holds prepared data ({MANIFEST_FILE}); pass --force to replace it (runs \
             trained on it will then refuse to resume)",
            dir.display()
        );
    }
    if entries.next().is_some() {
        bail!(
            "{}: is not empty; choose a new --out or pass --force to write into it",
            dir.display()
        );
    }
    Ok(())
}

/// Reads every input's bytes, with the names the manifest records.
fn read_sources(source: &Source) -> Result<(Vec<Vec<u8>>, Vec<String>)> {
    match source {
        Source::Builtin => Ok((
            vec![crate::corpus::builtin_corpus(crate::corpus::BUILTIN_BYTES).into_bytes()],
            vec!["builtin".into()],
        )),
        Source::Paths(paths) => {
            let mut files = Vec::new();
            for p in paths {
                collect_files(p, &mut files)?;
            }
            if files.is_empty() {
                bail!("no input files found in {paths:?}");
            }
            files.sort();
            let contents = files
                .iter()
                .map(|f| std::fs::read(f).with_context(|| format!("{}: cannot read", f.display())))
                .collect::<Result<Vec<_>>>()?;
            Ok((
                contents,
                files.iter().map(|f| f.display().to_string()).collect(),
            ))
        }
    }
}

/// The inputs as text, naming the first that is not UTF-8 (every tokenizer but `byte` reads
/// text; `byte` takes any bytes).
fn as_texts(contents: Vec<Vec<u8>>, sources: &[String]) -> Result<Vec<String>> {
    contents
        .into_iter()
        .zip(sources)
        .map(|(bytes, name)| {
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{name}: not UTF-8 text (invalid byte at offset {}); only --tokenizer byte \
                     reads arbitrary bytes",
                    e.utf8_error().valid_up_to()
                )
            })
        })
        .collect()
}

/// The tokenizer `spec` asks for and the token ids of every input, in order.
fn tokenize(
    spec: &TokenizerSpec,
    contents: Vec<Vec<u8>>,
    sources: &[String],
) -> Result<(Tokenizer, Vec<u32>)> {
    if let TokenizerSpec::Byte = spec {
        let ids = contents.concat().into_iter().map(u32::from).collect();
        return Ok((Tokenizer::Byte, ids));
    }
    let texts = as_texts(contents, sources)?;
    let tokenizer = Tokenizer::build(spec, &texts)?;
    let pieces: Vec<&str> = texts.iter().flat_map(|t| chunks(t, 1 << 16)).collect();
    let encoded: Vec<Vec<u32>> = pieces
        .par_iter()
        .map(|piece| tokenizer.encode(piece))
        .collect::<Result<_>>()?;
    Ok((tokenizer, encoded.concat()))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{}: no such file or folder", path.display()))?;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("{}: cannot list", path.display()))?
        {
            collect_files(&entry?.path(), out)?;
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Splits text into pieces of roughly `size` bytes at line ends, for parallel tokenizing.
fn chunks(text: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > size {
        let mut cut = size;
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let cut = rest[cut..].find('\n').map_or(rest.len(), |i| cut + i + 1);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Runs the whole preparation and returns the manifest it wrote.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest> {
    if !(0.0..0.5).contains(&opts.val_fraction) || opts.val_fraction == 0.0 {
        bail!("--val-fraction {}: must be in (0, 0.5)", opts.val_fraction);
    }
    refuse_prepared_folder(&opts.out_dir, opts.force)?;
    let (contents, sources) = read_sources(&opts.source)?;
    let (tokenizer, ids) = tokenize(&opts.tokenizer, contents, &sources)?;
    let n_val = ((ids.len() as f64) * opts.val_fraction).ceil() as usize;
    if ids.len() < 1000 || n_val < 100 {
        bail!(
            "{}: only {} tokens in all: too little to split into train and validation (at \
             least 1000 needed)",
            sources.join(", "),
            ids.len()
        );
    }
    let (train, val) = ids.split_at(ids.len() - n_val);

    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("{}: cannot create output folder", opts.out_dir.display()))?;
    let vocab_size = tokenizer.vocab_size();
    let dtype = TokenDtype::for_vocab(vocab_size);
    tokenizer.save(&opts.out_dir)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        vocab_size,
        dtype,
        tokenizer: match &opts.tokenizer {
            TokenizerSpec::Byte => "byte".into(),
            TokenizerSpec::Char => "char".into(),
            TokenizerSpec::Bpe(n) => format!("bpe:{n}"),
            TokenizerSpec::File(p) => p.display().to_string(),
        },
        train: write_shard(&opts.out_dir, "train.bin", train, dtype)?,
        val: write_shard(&opts.out_dir, "val.bin", val, dtype)?,
        sources,
    };
    nuwa_core::atomic_write(
        &opts.out_dir.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(manifest)
}
