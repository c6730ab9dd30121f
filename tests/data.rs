//! Real corpora: tokenizers against reference ids, `prepare` into shards, training from
//! shards (several, sequential or random, resumed exactly), nanoGPT's files, bits per byte,
//! and every bad input the data path can meet.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{final_files, killed_after, quiet, resuming, tiny_recipe};
use metamix::data::{
    Dataset, Meta, PrepareOptions, Tokenizer, TokenizerSpec, hf_tokenizer::HfTokenizer, prepare,
};
use metamix::train::train;

const FIXTURE_TOKENIZER: &str = "tests/fixtures/tiny_tokenizer.json";

fn hf(path: &str) -> HfTokenizer {
    HfTokenizer::from_json_text(&std::fs::read_to_string(path).unwrap(), Path::new(path)).unwrap()
}

#[test]
fn committed_tokenizer_json_gives_the_ids_python_tokenizers_gives() {
    // Ids computed once with Python `tokenizers` 0.23.3 from the same file.
    let t = hf(FIXTURE_TOKENIZER);
    assert_eq!(t.vocab_size(), 320);
    assert_eq!(t.eot(), Some(0), "</s> is its end-of-document token");
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.";
    let expected = [
        38, 73, 82, 304, 221, 35, 275, 73, 90, 294, 26, 199, 34, 69, 70, 79, 265, 264, 69, 289, 82,
        79, 310, 314, 259, 78, 89, 274, 85, 82, 84, 258, 82, 12, 290, 287, 263, 69, 261, 80, 69,
        65, 75, 14,
    ];
    assert_eq!(t.encode(text).unwrap(), expected);
    let ids = t.encode("naïve 東京 🦀").unwrap();
    assert_eq!(
        ids,
        [
            78, 65, 128, 108, 285, 221, 163, 252, 110, 161, 119, 106, 221, 173, 254, 100, 223
        ]
    );
    assert_eq!(t.decode(&ids), "naïve 東京 🦀");
    // Cut inside the crab's bytes: a replacement character, no panic.
    assert!(t.decode(&ids[..ids.len() - 1]).ends_with('\u{FFFD}'));
}

#[test]
fn gpt2s_hugging_face_form_encodes_as_tiktoken_does() {
    let tiktoken = Tokenizer::Gpt2(metamix::data::Gpt2Tokenizer::new().unwrap());
    let json = tiktoken.to_hf_json();
    let converted = HfTokenizer::from_json_text(&json.to_string(), Path::new("gpt2")).unwrap();
    let text = std::fs::read_to_string("data/shakespeare.txt").unwrap();
    let sample = format!(
        "{} naïve 東京 🦀 1234567 don't  we'll\t\n\n",
        &text[..20_000]
    );
    assert_eq!(
        converted.encode(&sample).unwrap(),
        tiktoken.encode(&sample).unwrap()
    );
    assert_eq!(converted.vocab_size(), 50257);
    assert_eq!(converted.eot(), Some(50256));
    assert_eq!(converted.token_bytes(), tiktoken.token_bytes());
}

#[test]
fn every_tokenizer_round_trips_unicode() {
    let text = "Ünïcödé: naïve café, 東京, emoji 🦀🚀, RTL שלום, combining é.\n";
    let chars = Tokenizer::Char(metamix::data::CharTokenizer::fit(text.chars(), true));
    let bpe = Tokenizer::Hf(HfTokenizer::train_bpe(300, std::iter::once(text.repeat(10))).unwrap());
    for t in [
        chars,
        Tokenizer::Byte { eot: false },
        Tokenizer::Gpt2(metamix::data::Gpt2Tokenizer::new().unwrap()),
        Tokenizer::Hf(hf(FIXTURE_TOKENIZER)),
        bpe,
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text, "{t:?}");
        let bytes = t.token_bytes();
        let total: u32 = ids.iter().map(|&i| bytes[i as usize]).sum();
        assert_eq!(total as usize, text.len(), "{t:?}: bytes per token add up");
        // Saved and loaded back, it is the same tokenizer.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path).unwrap();
        let kind = t.kind();
        let back = Tokenizer::load(&path, kind).unwrap();
        assert_eq!(back.encode(text).unwrap(), ids, "{t:?} after save/load");
        assert_eq!(back.eot(), t.eot());
    }
}

/// A folder of documents in every input format, one not UTF-8 and one empty.
fn corpus(dir: &Path) -> PathBuf {
    let root = dir.join("corpus");
    std::fs::create_dir_all(root.join("nested")).unwrap();
    let text = std::fs::read_to_string("data/shakespeare.txt").unwrap();
    // 40 documents of ~2-4 KB each.
    let docs: Vec<&str> = (0..40)
        .map(|i| &text[i * 4000..i * 4000 + 2000 + i * 50])
        .collect();
    for (i, d) in docs[..10].iter().enumerate() {
        std::fs::write(root.join(format!("doc{i}.txt")), d).unwrap();
    }
    for (i, d) in docs[10..15].iter().enumerate() {
        std::fs::write(root.join(format!("nested/doc{i}.md")), d).unwrap();
    }
    let jsonl: String = docs[15..30]
        .iter()
        .map(|d| serde_json::json!({"text": d, "id": 1}).to_string() + "\n")
        .collect();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(root.join("nested/part.jsonl.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(jsonl.as_bytes()).unwrap();
    gz.finish().unwrap();
    let jsonl: String = docs[30..]
        .iter()
        .map(|d| serde_json::json!({"text": d}).to_string() + "\n")
        .collect::<String>()
        + "{\"title\": \"no text field\"}\n";
    std::fs::write(
        root.join("part.jsonl.zst"),
        zstd::encode_all(jsonl.as_bytes(), 3).unwrap(),
    )
    .unwrap();
    std::fs::write(root.join("latin1.txt"), b"caf\xe9 au lait").unwrap();
    std::fs::write(root.join("empty.txt"), b"").unwrap();
    std::fs::write(root.join("notes.csv"), b"a,b").unwrap();
    root
}

fn prepare_opts(tokenizer: &str, out: &Path) -> PrepareOptions {
    PrepareOptions {
        tokenizer: tokenizer.parse().unwrap(),
        out: Some(out.to_path_buf()),
        val_fraction: 0.2,
        shard_tokens: 4096,
        ..PrepareOptions::default()
    }
}

#[test]
fn prepare_reads_every_format_into_verified_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let root = corpus(tmp.path());
    let out = tmp.path().join("prepared");
    let p = prepare(&[root.display().to_string()], &prepare_opts("gpt2", &out)).unwrap();
    let m = Meta::load(&out).unwrap();
    assert_eq!(m, p.meta);
    assert_eq!(m.documents.train + m.documents.val, 40);
    assert!(
        m.documents.val >= 3 && m.documents.train >= 25,
        "{:?}",
        m.documents
    );
    assert_eq!(m.skipped_documents.invalid_utf8, 1);
    assert_eq!(m.skipped_documents.empty, 1);
    assert_eq!(m.skipped_documents.no_text_field, 1);
    assert_eq!(m.skipped_files, 1, "notes.csv");
    assert_eq!(m.dtype, metamix::data::Dtype::Uint16);
    assert_eq!(m.eot_id, Some(50256));
    assert!(m.shards.len() > 4, "4096-token shards: {}", m.shards.len());
    let listed: u64 = m.shards.iter().map(|s| s.tokens).sum();
    assert_eq!(listed, m.tokens.train + m.tokens.val);
    // One end-of-document token per document.
    let data = Dataset::open_prepared(&out, None).unwrap();
    let mut all = vec![];
    for s in data.train.shards.iter().chain(&data.val.shards) {
        s.extend_into(0, s.len(), &mut all);
    }
    assert_eq!(all.iter().filter(|&&t| t == 50256).count(), 40);

    // The split depends on each document's text, not on the order files are read in.
    let reversed = tmp.path().join("reversed");
    // Named one by one (a file prepare does not read is an error when named).
    let mut files: Vec<String> = walk(&root);
    files.retain(|f| !f.ends_with(".csv"));
    files.reverse();
    let q = prepare(&files, &prepare_opts("gpt2", &reversed)).unwrap();
    assert_eq!(q.meta.documents, m.documents);
    assert_eq!(q.meta.skipped_files, 0);
    assert_eq!(q.meta.tokens, m.tokens);

    // Prepared again into the same folder: refused without --force.
    let err = prepare(&[root.display().to_string()], &prepare_opts("gpt2", &out))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    let forced = PrepareOptions {
        force: true,
        ..prepare_opts("byte", &out)
    };
    prepare(&[root.display().to_string()], &forced).unwrap();
    assert_eq!(Meta::load(&out).unwrap().tokenizer, "byte");
    assert_eq!(
        Meta::load(&out).unwrap().vocab_size,
        257,
        "bytes plus end-of-document"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out.sort();
    out
}

/// Train the tiny model on a prepared folder.
fn sharded_recipe(runs: &Path, data: &Path, extra: &[&str]) -> metamix::recipe::Recipe {
    let mut overrides = vec![format!("data.path=\"{}\"", data.display())];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    tiny_recipe(runs, &refs)
}

#[test]
fn training_from_many_small_shards_resumes_exactly_with_either_sampling() {
    let tmp = tempfile::tempdir().unwrap();
    let root = corpus(tmp.path());
    let out = tmp.path().join("prepared");
    prepare(
        &[root.display().to_string()],
        &prepare_opts("bpe:400", &out),
    )
    .unwrap();
    for sampling in ["random", "sequential"] {
        let set = format!("data.sampling=\"{sampling}\"");
        let straight = sharded_recipe(&tmp.path().join(format!("a-{sampling}")), &out, &[&set]);
        let s = train(&straight, &quiet()).unwrap();
        assert_eq!(s.step, 8);
        assert!(
            s.val_bits_per_byte
                .is_some_and(|b| b.is_finite() && b > 0.0)
        );
        let split = sharded_recipe(&tmp.path().join(format!("b-{sampling}")), &out, &[&set]);
        train(&split, &killed_after(4)).unwrap();
        train(&split, &resuming()).unwrap();
        let a = final_files(&straight.run_dir(), 8);
        let b = final_files(&split.run_dir(), 8);
        assert!(a.0 == b.0, "{sampling}: weights differ after resume");
        // The run keeps the tokenizer: sample and eval need no recipe or data folder.
        let run = metamix::run::Run::open(&split.run_dir()).unwrap();
        assert_eq!(run.tokenizer.as_ref().unwrap().vocab_size(), 400);
        // Resumed with the other sampling: refused, naming the key.
        let other = if sampling == "random" {
            "sequential"
        } else {
            "random"
        };
        let mut more = sharded_recipe(
            &tmp.path().join(format!("b-{sampling}")),
            &out,
            &[&format!("data.sampling=\"{other}\""), "training.steps=12"],
        );
        more.name = split.name.clone();
        let err = train(&more, &resuming()).unwrap_err();
        assert!(format!("{err:#}").contains("data.sampling"), "{err:#}");
    }
}

#[test]
fn damaged_or_mismatched_prepared_data_is_refused_naming_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let root = corpus(tmp.path());
    let out = tmp.path().join("prepared");
    prepare(&[root.display().to_string()], &prepare_opts("gpt2", &out)).unwrap();
    let meta = Meta::load(&out).unwrap();
    let shard = out.join(&meta.shards[1].file);
    let good = std::fs::read(&shard).unwrap();
    let open_err = || format!("{:#}", Dataset::open_prepared(&out, None).err().unwrap());

    let mut flipped = good.clone();
    flipped[10] ^= 1;
    std::fs::write(&shard, &flipped).unwrap();
    let e = open_err();
    assert!(
        e.contains(&meta.shards[1].file) && e.contains("SHA-256"),
        "{e}"
    );

    std::fs::write(&shard, &good[..good.len() - 2]).unwrap();
    let e = open_err();
    assert!(
        e.contains(&meta.shards[1].file) && e.contains("truncated"),
        "{e}"
    );

    std::fs::remove_file(&shard).unwrap();
    let e = open_err();
    assert!(
        e.contains(&meta.shards[1].file) && e.contains("missing"),
        "{e}"
    );
    std::fs::write(&shard, &good).unwrap();
    Dataset::open_prepared(&out, None).unwrap();

    // A recipe whose tokenizer is not the folder's.
    let spec: TokenizerSpec = "char".parse().unwrap();
    let e = format!(
        "{:#}",
        Dataset::open_prepared(&out, Some(&spec)).err().unwrap()
    );
    assert!(e.contains("gpt2") && e.contains("char"), "{e}");

    // A model vocabulary smaller than the tokenizer's.
    let r = sharded_recipe(&tmp.path().join("runs"), &out, &["model.vocab_size=1000"]);
    let e = format!("{:#}", train(&r, &quiet()).unwrap_err());
    assert!(e.contains("model.vocab_size") && e.contains("50257"), "{e}");
    assert!(!r.run_dir().join("recipe.toml").exists(), "nothing written");

    // prepare killed halfway: the partial folder has no meta.json and is not data.
    let partial = tmp.path().join("half");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("train-00000.bin"), [0u8; 64]).unwrap();
    let r = sharded_recipe(&tmp.path().join("runs"), &partial, &[]);
    let e = format!("{:#}", train(&r, &quiet()).unwrap_err());
    assert!(
        e.contains("meta.json") && e.contains("metamix prepare"),
        "{e}"
    );
}

#[test]
fn bad_prepare_inputs_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = |inputs: &[&str], tokenizer: &str| {
        let inputs: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
        format!(
            "{:#}",
            prepare(&inputs, &prepare_opts(tokenizer, &out))
                .err()
                .unwrap()
        )
    };
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = err(&[empty.to_str().unwrap()], "char");
    assert!(e.contains("empty"), "{e}");
    let e = err(&[tmp.path().join("nope.txt").to_str().unwrap()], "char");
    assert!(e.contains("nope.txt") && e.contains("no such"), "{e}");
    let e = err(&[&format!("{}/*.parquet", tmp.path().display())], "char");
    assert!(e.contains("glob matches no"), "{e}");
    let bad_json = tmp.path().join("bad_tokenizer.json");
    std::fs::write(&bad_json, "{\"model\": 3}").unwrap();
    std::fs::write(tmp.path().join("a.txt"), "some text here ".repeat(100)).unwrap();
    let a = tmp.path().join("a.txt");
    let e = err(&[a.to_str().unwrap()], bad_json.to_str().unwrap());
    assert!(
        e.contains("bad_tokenizer.json") && e.contains("tokenizer.json"),
        "{e}"
    );
    // Something else in --out: refused even with --force.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("precious.txt"), "keep me").unwrap();
    let forced = PrepareOptions {
        force: true,
        ..prepare_opts("char", &out)
    };
    let e = format!(
        "{:#}",
        prepare(&[a.display().to_string()], &forced).err().unwrap()
    );
    assert!(e.contains("not a prepared dataset"), "{e}");
    assert!(out.join("precious.txt").exists());

    // A prepared dataset with something else put in it is not replaced either.
    let prepared = tmp.path().join("prepared");
    prepare(&[a.display().to_string()], &prepare_opts("char", &prepared)).unwrap();
    std::fs::create_dir_all(prepared.join("raw")).unwrap();
    std::fs::write(prepared.join("raw/corpus.txt"), "more text ".repeat(100)).unwrap();
    let forced = PrepareOptions {
        force: true,
        ..prepare_opts("char", &prepared)
    };
    let e = format!(
        "{:#}",
        prepare(&[a.display().to_string()], &forced).err().unwrap()
    );
    assert!(e.contains("not a prepared dataset"), "{e}");
    assert!(prepared.join("raw/corpus.txt").exists());
    std::fs::remove_dir_all(prepared.join("raw")).unwrap();
    prepare(&[a.display().to_string()], &forced).unwrap();
    assert!(prepared.join("meta.json").exists());
}

#[test]
fn nanogpt_train_bin_loads_with_the_tokenizer_that_made_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nanogpt");
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string("data/shakespeare.txt").unwrap();
    let gpt2 = metamix::data::Gpt2Tokenizer::new().unwrap();
    // What nanoGPT's data/shakespeare/prepare.py writes: raw uint16 ids.
    for (file, part) in [
        ("train.bin", &text[..50_000]),
        ("val.bin", &text[50_000..60_000]),
    ] {
        let bytes: Vec<u8> = gpt2
            .encode(part)
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect();
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    let r = sharded_recipe(&tmp.path().join("runs"), &dir, &["data.tokenizer=\"gpt2\""]);
    let s = train(&r, &quiet()).unwrap();
    assert_eq!(s.step, 8);
    let r = sharded_recipe(&tmp.path().join("runs2"), &dir, &[]);
    let e = format!("{:#}", train(&r, &quiet()).unwrap_err());
    assert!(e.contains("data.tokenizer") && e.contains("gpt2"), "{e}");
}

#[test]
fn bits_per_byte_is_the_loss_per_byte_in_bits() {
    // Bytes: one byte per token, so bits per byte is the loss over ln 2 exactly.
    let tmp = tempfile::tempdir().unwrap();
    let r = tiny_recipe(tmp.path(), &["data.tokenizer=\"byte\""]);
    let s = train(&r, &quiet()).unwrap();
    let (loss, bpb) = (s.val_loss.unwrap(), s.val_bits_per_byte.unwrap());
    assert!(
        (bpb - loss / std::f64::consts::LN_2).abs() < 1e-9,
        "{bpb} vs {loss}"
    );
    // The run prepared its text into its own folder, and a resume reuses it.
    let meta = Meta::load(&r.run_dir().join("data")).unwrap();
    assert_eq!(meta.tokenizer, "byte");
    assert_eq!(meta.split_rule, "tail");
    assert_eq!(
        meta.vocab_size, 256,
        "one document: no end-of-document token"
    );
    // GPT-2 tokens carry several bytes each: a loss per token well above the byte model's
    // bits per byte.
    let r = tiny_recipe(
        &tmp.path().join("g"),
        &["data.tokenizer=\"gpt2\"", "training.steps=2"],
    );
    let s = train(&r, &quiet()).unwrap();
    let (loss, bpb) = (s.val_loss.unwrap(), s.val_bits_per_byte.unwrap());
    assert!(bpb < loss / std::f64::consts::LN_2 / 2.0, "{bpb} vs {loss}");
}

#[test]
fn a_long_text_read_in_pieces_tokenises_as_the_whole_would() {
    // Shakespeare is 4.8 MB: read in 1 MiB pieces, tokenised in parallel, split at 90%.
    let text = std::fs::read_to_string("data/shakespeare.txt").unwrap();
    let opts = PrepareOptions {
        tokenizer: TokenizerSpec::Gpt2,
        ..PrepareOptions::default()
    };
    let p = prepare(&["data/shakespeare.txt".to_string()], &opts).unwrap();
    let (train, val) = p.memory.unwrap();
    let gpt2 = metamix::data::Gpt2Tokenizer::new().unwrap();
    let cut = (0.9 * text.len() as f64) as usize;
    assert_eq!(train, gpt2.encode(&text[..cut]));
    assert_eq!(val, gpt2.encode(&text[cut..]));
    assert_eq!(p.meta.bytes.train as usize, cut);
}
