//! `cargo xtask make-tasks`: small multiple-choice tasks for `disp eval mc`, built from the
//! held-out public-domain texts that `fetch-assets` writes.
//!
//! Each example shows two consecutive sentences (or verses) and asks which of four candidates
//! comes next: the true one, or one of three drawn from elsewhere in the same book with a
//! similar length (so length alone does not give the answer away). Everything is drawn from a
//! fixed-seed generator, so the files are the same on every machine.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use disp_io::rng::SplitMix64;

use crate::util::{secs, write_if_changed};
use crate::Ctx;

/// Examples per task file.
const EXAMPLES: usize = 200;
/// Sentences outside this range of characters are neither asked about nor used as context or
/// distractors: very short ones ("Yes.") carry too little signal, very long ones dominate.
const MIN_CHARS: usize = 20;
const MAX_CHARS: usize = 300;
/// A distractor's length is within this fraction of the true sentence's.
const LENGTH_TOLERANCE: f64 = 0.3;
const DISTRACTORS: usize = 3;
/// Distractors come from at least this many sentences away from the example's own.
const MIN_DISTANCE: usize = 10;
const SEED: u64 = 20_240_601;

/// One line of a task file; the field order is the one the README documents.
#[derive(Serialize, Debug, Clone, PartialEq)]
struct Example {
    context: String,
    choices: Vec<String>,
    gold: usize,
}

/// A book as runs of sentences; an example never spans two runs (chapters).
type Runs = Vec<Vec<String>>;

fn normalise_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Words that end in a full stop without ending the sentence.
const ABBREVIATIONS: [&str; 9] = ["Mr", "Mrs", "Dr", "St", "Esq", "Wm", "Capt", "Col", "Messrs"];

/// Splits whitespace-normalised prose after `.`, `!` or `?` (and any closing quotes) when the
/// next word starts with a capital or an opening quote, except after a title such as "Mr." or
/// an initial.
fn split_sentences(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut sentences = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if matches!(chars[i], '.' | '!' | '?') {
            let mut end = i + 1;
            while end < chars.len() && matches!(chars[end], '"' | '\'' | ')' | '\u{201D}' | '\u{2019}') {
                end += 1;
            }
            let next = chars.get(end + 1).copied();
            let at_break =
                chars.get(end) == Some(&' ') && next.is_some_and(|c| c.is_uppercase() || matches!(c, '"' | '\'' | '\u{201C}' | '\u{2018}'));
            if at_break && !(chars[i] == '.' && ends_with_abbreviation(&chars[start..i])) {
                sentences.push(chars[start..end].iter().collect::<String>());
                start = end + 1;
                i = end;
            }
        }
        i += 1;
    }
    if start < chars.len() {
        sentences.push(chars[start..].iter().collect::<String>());
    }
    sentences
}

fn ends_with_abbreviation(before_stop: &[char]) -> bool {
    let word: String = before_stop.iter().rev().take_while(|c| c.is_alphabetic()).collect::<Vec<_>>().into_iter().rev().collect();
    ABBREVIATIONS.contains(&word.as_str()) || (word.chars().count() == 1 && word.chars().all(char::is_uppercase))
}

/// Persuasion as one run of sentences per chapter. The text is hard-wrapped with blank lines
/// between paragraphs; chapters start with a "Chapter N" paragraph, the title page comes before
/// chapter 1 and "Finis" after the last.
fn persuasion_runs(text: &str) -> Result<Runs> {
    let mut runs: Runs = Vec::new();
    let mut paragraph = Vec::new();
    let mut paragraphs = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !paragraph.is_empty() {
                paragraphs.push(normalise_whitespace(&paragraph.join(" ")));
                paragraph.clear();
            }
        } else {
            paragraph.push(line);
        }
    }
    for paragraph in paragraphs {
        let is_heading = paragraph.strip_prefix("Chapter ").is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
        if is_heading {
            runs.push(Vec::new());
        } else if paragraph == "Finis" {
            break;
        } else if let Some(run) = runs.last_mut() {
            run.extend(split_sentences(&paragraph));
        }
    }
    if runs.len() < 2 {
        bail!("found {} \"Chapter N\" headings; is this Persuasion?", runs.len());
    }
    Ok(runs)
}

/// The Gospel of John as one run of verses per chapter: "John N" heading lines, then one verse
/// per line, "  V text".
fn john_runs(text: &str) -> Result<Runs> {
    let mut runs: Runs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.strip_prefix("John ").is_some_and(|n| n.chars().all(|c| c.is_ascii_digit())) {
            runs.push(Vec::new());
            continue;
        }
        let verse = line.split_once(' ').filter(|(v, _)| v.chars().all(|c| c.is_ascii_digit()));
        match (verse, runs.last_mut()) {
            (Some((_, words)), Some(run)) => run.push(normalise_whitespace(words)),
            _ => bail!("line {}: expected \"John N\" or a numbered verse, got {line:?}", number + 1),
        }
    }
    if runs.len() < 2 {
        bail!("found {} \"John N\" chapter headings", runs.len());
    }
    Ok(runs)
}

fn usable(sentence: &str) -> bool {
    (MIN_CHARS..=MAX_CHARS).contains(&sentence.chars().count())
}

/// `EXAMPLES` next-sentence questions over `runs`, or an error when the book is too short.
fn build_examples(runs: &Runs, rng: &mut SplitMix64) -> Result<Vec<Example>> {
    // Every sentence with its position in the whole book, for distance checks.
    let flat: Vec<(usize, &str)> = runs.iter().flatten().enumerate().map(|(i, s)| (i, s.as_str())).collect();
    let pool: Vec<(usize, &str)> = flat.iter().copied().filter(|(_, s)| usable(s)).collect();
    // Candidate questions: three usable consecutive sentences of one run, by the book position of
    // the first.
    let mut candidates = Vec::new();
    let mut offset = 0;
    for run in runs {
        for i in 0..run.len().saturating_sub(2) {
            if run[i..i + 3].iter().all(|s| usable(s)) {
                candidates.push(offset + i);
            }
        }
        offset += run.len();
    }
    rng.shuffle(&mut candidates);

    // (book position of the first context sentence, context, true sentence, distractors)
    let mut chosen: Vec<(usize, String, &str, Vec<&str>)> = Vec::new();
    for first in candidates {
        if chosen.len() == EXAMPLES {
            break;
        }
        // Examples share no sentence.
        if chosen.iter().any(|(other, ..)| other.abs_diff(first) < 3) {
            continue;
        }
        let truth = flat[first + 2].1;
        let length = truth.chars().count() as f64;
        let eligible: Vec<&str> = pool
            .iter()
            .filter(|(at, s)| {
                at.abs_diff(first + 2) >= MIN_DISTANCE
                    && (s.chars().count() as f64 - length).abs() <= LENGTH_TOLERANCE * length
                    && ![flat[first].1, flat[first + 1].1, truth].contains(s)
            })
            .map(|(_, s)| *s)
            .collect();
        let mut distractors: Vec<&str> = Vec::new();
        // Distinct texts: a book repeats some sentences ("Anne was silent.").
        let mut unique = eligible.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() < DISTRACTORS {
            continue;
        }
        while distractors.len() < DISTRACTORS {
            let pick = eligible[rng.below(eligible.len())];
            if !distractors.contains(&pick) {
                distractors.push(pick);
            }
        }
        let context = format!("{} {}", flat[first].1, flat[first + 1].1);
        chosen.push((first, context, truth, distractors));
    }
    if chosen.len() < EXAMPLES {
        bail!("only {} usable examples, {EXAMPLES} needed", chosen.len());
    }
    // In book order, so the file reads front to back.
    chosen.sort_by_key(|(first, ..)| *first);
    // Every answer position equally often, in random order: position can never predict the
    // answer, even by chance.
    let mut golds: Vec<usize> = (0..EXAMPLES).map(|i| i % (DISTRACTORS + 1)).collect();
    rng.shuffle(&mut golds);
    Ok(chosen
        .into_iter()
        .zip(golds)
        .map(|((_, context, truth, distractors), gold)| {
            let mut choices: Vec<String> = distractors.iter().map(|s| format!(" {s}")).collect();
            choices.insert(gold, format!(" {truth}"));
            Example { context, choices, gold }
        })
        .collect())
}

fn to_jsonl(examples: &[Example]) -> String {
    examples.iter().map(|e| serde_json::to_string(e).expect("plain strings serialise") + "\n").collect()
}

struct Source {
    task: &'static str,
    text: &'static str,
    parse: fn(&str) -> Result<Runs>,
    /// Which `fetch-assets` invocation writes the text.
    fetched_by: &'static str,
    /// Whether a missing text is an error (otherwise the task is skipped with a note).
    required: bool,
}

const SOURCES: [Source; 2] = [
    Source {
        task: "persuasion-next-sentence",
        text: "data/heldout/persuasion.txt",
        parse: persuasion_runs,
        fetched_by: "cargo xtask fetch-assets",
        required: true,
    },
    Source {
        task: "kjv-john-next-verse",
        text: "data/heldout/kjv-john.txt",
        parse: john_runs,
        fetched_by: "cargo xtask fetch-assets --extra",
        required: false,
    },
];

/// `cargo xtask make-tasks`.
pub fn run() -> ExitCode {
    let start = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf();
    let mut ctx = Ctx::new(root, false);
    match make_tasks(&mut ctx) {
        Ok(()) => {
            println!("\nmake-tasks: done in {}", secs(start));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: [tasks] {}", crate::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Writes every task whose source text is present to tests/tasks/<task>.jsonl.
fn make_tasks(ctx: &mut Ctx) -> Result<()> {
    for (index, source) in SOURCES.iter().enumerate() {
        let text_path = ctx.root.join(source.text);
        if !text_path.exists() {
            if source.required {
                bail!("{}: missing; run `{}` first", source.text, source.fetched_by);
            }
            ctx.say("tasks", &format!("skipped {}: {} is missing (run `{}`)", source.task, source.text, source.fetched_by));
            continue;
        }
        let text = std::fs::read_to_string(&text_path).with_context(|| format!("{}: cannot read", source.text))?;
        let runs = (source.parse)(&text).with_context(|| source.text.to_string())?;
        // One generator per task, so adding a source never changes another task's file.
        let mut rng = SplitMix64::new(SEED + index as u64);
        let examples = build_examples(&runs, &mut rng).with_context(|| source.text.to_string())?;
        let relative = format!("tests/tasks/{}.jsonl", source.task);
        let sentences: usize = runs.iter().map(Vec::len).sum();
        // write_if_changed goes through a `.partial` name and a rename.
        if write_if_changed(&ctx.root.join(&relative), to_jsonl(&examples).as_bytes())? {
            ctx.act("tasks", &format!("wrote {relative}: {} examples from {sentences} sentences of {}", examples.len(), source.text));
        } else {
            ctx.say("tasks", &format!("{relative} is up to date ({} examples)", examples.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_stops_but_not_after_titles_or_initials() {
        let text = "Mr. Elliot came in. \"Yes!\" said she. Was F. W. there? \"No,\" she said. It is Esq. Smith.";
        assert_eq!(
            split_sentences(text),
            vec!["Mr. Elliot came in.", "\"Yes!\" said she.", "Was F. W. there?", "\"No,\" she said.", "It is Esq. Smith."]
        );
    }

    #[test]
    fn persuasion_runs_follow_chapters_and_unwrap_lines() {
        let text = "Persuasion\n\nby\n\nChapter 1\n\n\nSir Walter was vain\nof his looks.  He read\nthe Baronetage.\n\nChapter 2\n\nAnne sighed.\n\nFinis\n\nNot part of it.\n";
        let runs = persuasion_runs(text).unwrap();
        assert_eq!(runs, vec![vec!["Sir Walter was vain of his looks.".to_string(), "He read the Baronetage.".into()], vec!["Anne sighed.".into()]]);
    }

    #[test]
    fn john_runs_strip_verse_numbers_and_reject_other_lines() {
        let runs = john_runs("John 1\n\n  1 In the beginning.\n  2 The same.\n\nJohn 2\n\n  1 And the third day.\n").unwrap();
        assert_eq!(runs, vec![vec!["In the beginning.".to_string(), "The same.".into()], vec!["And the third day.".into()]]);
        let err = john_runs("John 1\n  1 fine\nstray text\n").unwrap_err();
        assert!(err.to_string().starts_with("line 3:"), "{err}");
    }

    /// A synthetic book: sentences of varied lengths, each unique.
    fn book() -> Runs {
        (0..8)
            .map(|chapter| {
                (0..120).map(|i| format!("Chapter {chapter} sentence {i} says {}.", "word ".repeat(2 + (i * 7 + chapter) % 30).trim_end())).collect()
            })
            .collect()
    }

    #[test]
    fn examples_are_deterministic_and_well_formed() {
        let runs = book();
        let examples = build_examples(&runs, &mut SplitMix64::new(SEED)).unwrap();
        assert_eq!(examples, build_examples(&runs, &mut SplitMix64::new(SEED)).unwrap());
        assert_ne!(examples, build_examples(&runs, &mut SplitMix64::new(SEED + 1)).unwrap());
        assert_eq!(examples.len(), EXAMPLES);
        let flat: Vec<&String> = runs.iter().flatten().collect();
        let mut golds = [0; DISTRACTORS + 1];
        for example in &examples {
            assert_eq!(example.choices.len(), DISTRACTORS + 1);
            golds[example.gold] += 1;
            // The context is two consecutive sentences and the gold choice the one after them.
            let at = flat.iter().position(|s| example.context.starts_with(s.as_str())).expect("context from the book");
            assert_eq!(example.context, format!("{} {}", flat[at], flat[at + 1]));
            let truth = &example.choices[example.gold];
            assert_eq!(truth, &format!(" {}", flat[at + 2]));
            let length = truth.chars().count() as f64;
            for choice in &example.choices {
                assert!(choice.starts_with(' '));
                assert!((choice.chars().count() as f64 - length).abs() <= LENGTH_TOLERANCE * length + 1.0, "{choice:?} vs {truth:?}");
            }
            let mut distinct = example.choices.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), example.choices.len(), "choices repeat");
        }
        assert!(golds.iter().all(|&n| n == EXAMPLES / (DISTRACTORS + 1)), "gold positions are not balanced: {golds:?}");
        assert!(examples.windows(2).any(|pair| pair[0].gold != pair[1].gold + 1), "gold positions follow a fixed cycle");
    }

    #[test]
    fn too_short_a_book_is_an_error() {
        let runs: Runs = vec![book()[0][..30].to_vec()];
        let err = build_examples(&runs, &mut SplitMix64::new(SEED)).unwrap_err();
        assert!(err.to_string().contains("usable examples"), "{err}");
    }
}
