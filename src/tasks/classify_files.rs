//! Classification data a user brings: LRA's TSV files (`Source\tTarget`, as written by
//! `lra_benchmarks/data/listops.py`) or JSONL (one object per line with a text and an integer
//! label field), and the tokenizers that turn the text into ids — bytes, as LRA's byte-level
//! text task, or whitespace words with a vocabulary built from the training file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// How text becomes token ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextTokenizer {
    /// UTF-8 bytes, ids 0..=255.
    #[default]
    Byte,
    /// Whitespace-separated words; id 0 is `<unk>` for words the training file lacks.
    Word,
}

/// One example as read: its text, its label and the line it came from (1-based, a TSV's
/// header being line 1) so that later errors can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledText {
    pub text: String,
    pub label: u32,
    pub line: usize,
}

/// Reads `.tsv` (LRA's: header `Source\tTarget`, then `text\tlabel`; the field names do not
/// apply) or `.jsonl` (`text_field` a string, `label_field` an integer ≥ 0). With
/// `strip_parens`, every `(` and `)` is removed and whitespace collapsed, as LRA's ListOps
/// pipeline does. Blank lines are skipped.
pub fn read_examples(
    path: &Path,
    text_field: &str,
    label_field: &str,
    strip_parens: bool,
) -> anyhow::Result<Vec<LabeledText>> {
    let shown = path.display();
    let tsv = match path.extension().and_then(|e| e.to_str()) {
        Some("tsv") => true,
        Some("jsonl") => false,
        _ => bail!("{shown}: unknown format; use a .tsv (LRA's Source\\tTarget) or .jsonl file"),
    };
    let content = std::fs::read_to_string(path).with_context(|| format!("cannot read {shown}"))?;
    if content.trim().is_empty() {
        bail!("{shown} holds no examples (the file is empty)");
    }
    let mut lines = content
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .enumerate();
    if tsv {
        let header = lines.next().map_or("", |(_, l)| l);
        if header != "Source\tTarget" {
            bail!("{shown}, line 1: found {header:?} but expected the header \"Source\\tTarget\"");
        }
    }
    let mut out = Vec::new();
    for (i, raw) in lines.filter(|(_, l)| !l.trim().is_empty()) {
        let line = i + 1;
        let (text, label) = if tsv {
            let (text, label) = raw
                .rsplit_once('\t')
                .with_context(|| format!("{shown}, line {line}: expected text<TAB>label"))?;
            let n = label.trim().parse::<u32>().ok();
            (
                text.to_string(),
                n.with_context(|| bad_label(&shown, line, label))?,
            )
        } else {
            let v: serde_json::Value = serde_json::from_str(raw)
                .with_context(|| format!("{shown}, line {line}: not a JSON object"))?;
            let text = v
                .get(text_field)
                .and_then(|t| t.as_str())
                .with_context(|| format!("{shown}, line {line}: no string field {text_field:?}"))?;
            let label = v
                .get(label_field)
                .with_context(|| format!("{shown}, line {line}: no label field {label_field:?}"))?;
            let n = label.as_u64().and_then(|n| u32::try_from(n).ok());
            (
                text.to_string(),
                n.with_context(|| bad_label(&shown, line, label))?,
            )
        };
        let text = if strip_parens {
            text.replace(['(', ')'], " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            text
        };
        out.push(LabeledText { text, label, line });
    }
    if out.is_empty() {
        bail!("{shown} holds no examples");
    }
    Ok(out)
}

fn bad_label(file: &impl std::fmt::Display, line: usize, found: impl std::fmt::Display) -> String {
    format!("{file}, line {line}: label {found} is not an integer ≥ 0")
}

/// Refuses a label the model has no output for, pointing at the first such line.
pub fn check_labels(
    examples: &[LabeledText],
    num_classes: usize,
    path: &Path,
) -> anyhow::Result<()> {
    let Some(max) = examples.iter().map(|e| e.label).max() else {
        return Ok(());
    };
    if let Some(e) = examples.iter().find(|e| e.label as usize >= num_classes) {
        bail!(
            "{}, line {}: label {} but num_classes is {num_classes} (labels 0..={}): set \
             task.classify.num_classes = {} or 0 to infer it from the training file",
            path.display(),
            e.line,
            e.label,
            num_classes.saturating_sub(1),
            max as usize + 1
        );
    }
    Ok(())
}

/// Text → ids. Saved as JSON `{"tokenizer": "word", "words": ["<unk>", ...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SavedVocabulary", into = "SavedVocabulary")]
pub struct Vocabulary {
    tokenizer: TextTokenizer,
    words: Vec<String>,
    ids: HashMap<String, u32>,
}

#[derive(Serialize, Deserialize)]
struct SavedVocabulary {
    tokenizer: TextTokenizer,
    words: Vec<String>,
}

impl From<SavedVocabulary> for Vocabulary {
    fn from(s: SavedVocabulary) -> Self {
        let ids = s
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        Self {
            tokenizer: s.tokenizer,
            words: s.words,
            ids,
        }
    }
}

impl From<Vocabulary> for SavedVocabulary {
    fn from(v: Vocabulary) -> Self {
        Self {
            tokenizer: v.tokenizer,
            words: v.words,
        }
    }
}

impl Vocabulary {
    /// For `Word`, ids in order of first appearance in `train` after `<unk>` = 0; only the
    /// training file counts, so evaluation text cannot leak into the vocabulary.
    pub fn build(tokenizer: TextTokenizer, train: &[LabeledText]) -> Vocabulary {
        let mut words = Vec::new();
        if tokenizer == TextTokenizer::Word {
            words.push("<unk>".to_string());
            let mut seen = std::collections::HashSet::new();
            for w in train.iter().flat_map(|e| e.text.split_whitespace()) {
                if w != "<unk>" && seen.insert(w) {
                    words.push(w.to_string());
                }
            }
        }
        SavedVocabulary { tokenizer, words }.into()
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.tokenizer {
            TextTokenizer::Byte => text.bytes().map(u32::from).collect(),
            TextTokenizer::Word => text
                .split_whitespace()
                .map(|w| self.ids.get(w).copied().unwrap_or(0))
                .collect(),
        }
    }

    pub fn size(&self) -> usize {
        match self.tokenizer {
            TextTokenizer::Byte => 256,
            TextTokenizer::Word => self.words.len(),
        }
    }

    pub fn tokenizer(&self) -> TextTokenizer {
        self.tokenizer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ext: &str, content: &str) -> tempfile::TempPath {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        std::io::Write::write_all(&mut f, content.as_bytes()).unwrap();
        f.into_temp_path()
    }

    fn err(ext: &str, content: &str) -> String {
        let p = file(ext, content);
        format!(
            "{:#}",
            read_examples(&p, "text", "label", false).unwrap_err()
        )
    }

    #[test]
    fn reads_lra_tsv_and_strips_listops_parentheses() {
        let p = file(
            ".tsv",
            "Source\tTarget\n( ( [MAX 2 9 ) ] )\t9\n\n( [MIN 4 7 ) ]\t4\n",
        );
        let got = read_examples(&p, "ignored", "ignored", true).unwrap();
        assert_eq!(
            got[0],
            LabeledText {
                text: "[MAX 2 9 ]".into(),
                label: 9,
                line: 2
            }
        );
        assert_eq!((got[1].line, got[1].label), (4, 4));
        let words: Vec<&str> = got[1].text.split(' ').collect();
        assert_eq!(super::super::listops::evaluate(&words), Some(4));
        let kept = read_examples(&p, "", "", false).unwrap();
        assert!(kept[0].text.starts_with("( ( [MAX"));
    }

    #[test]
    fn reads_jsonl() {
        let p = file(
            ".jsonl",
            "{\"review\": \"good film\", \"y\": 1}\r\n{\"review\": \"bad\", \"y\": 0}\n",
        );
        let got = read_examples(&p, "review", "y", false).unwrap();
        assert_eq!(
            got.iter().map(|e| (e.label, e.line)).collect::<Vec<_>>(),
            [(1, 1), (0, 2)]
        );
        assert_eq!(got[0].text, "good film");
    }

    #[test]
    fn errors_name_file_line_and_value() {
        let e = err(".tsv", "text\tlabel\nx\t1\n");
        assert!(
            e.contains("line 1") && e.contains("\"text\\tlabel\"") && e.contains("Source\\tTarget"),
            "{e}"
        );
        let e = err(".tsv", "Source\tTarget\nx\t1\ny\t-2\n");
        assert!(e.contains("line 3") && e.contains("label -2"), "{e}");
        let e = err(".jsonl", "{\"text\": \"a\", \"label\": 1.5}\n");
        assert!(e.contains("line 1") && e.contains("1.5"), "{e}");
        let e = err(
            ".jsonl",
            "{\"text\": \"a\", \"label\": 1}\n{\"txt\": \"b\", \"label\": 1}\n",
        );
        assert!(e.contains("line 2") && e.contains("\"text\""), "{e}");
        assert!(err(".jsonl", "{\"text\": \"a\"}").contains("\"label\""));
        assert!(err(".tsv", "Source\tTarget\n").contains("holds no examples"));
        assert!(err(".jsonl", "\n").contains("holds no examples"));
        assert!(err(".csv", "a,1").contains(".tsv") && err(".csv", "").contains(".jsonl"));
        let missing = std::env::temp_dir().join("metamix-no-such-file.tsv");
        let e = format!("{:#}", read_examples(&missing, "", "", false).unwrap_err());
        assert!(e.contains("metamix-no-such-file.tsv"), "{e}");
    }

    #[test]
    fn labels_beyond_num_classes_are_refused() {
        let ex = |label, line| LabeledText {
            text: String::new(),
            label,
            line,
        };
        let examples = [ex(1, 2), ex(4, 3), ex(2, 4)];
        assert!(check_labels(&examples, 5, Path::new("train.tsv")).is_ok());
        let e = check_labels(&examples, 3, Path::new("train.tsv"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.tsv, line 3: label 4") && e.contains("num_classes = 5"),
            "{e}"
        );
    }

    #[test]
    fn vocabularies_encode_and_round_trip() {
        let train = [LabeledText {
            text: "the cat the dog".into(),
            label: 0,
            line: 1,
        }];
        let v = Vocabulary::build(TextTokenizer::Word, &train);
        assert_eq!(v.size(), 4);
        assert_eq!(v.encode("dog the  bird cat"), [3, 1, 0, 2]);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"{"tokenizer":"word","words":["<unk>","the","cat","dog"]}"#
        );
        let back: Vocabulary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.encode("cat"), [2]);
        let b = Vocabulary::build(TextTokenizer::Byte, &train);
        assert_eq!((b.size(), b.encode("é!")), (256, vec![0xc3, 0xa9, 33]));
    }
}
