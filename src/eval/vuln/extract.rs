//! The code in a model answer: what the judge and the external analyzers are run on.

use crate::data::strip_scratchpad;

/// The code in a model answer: scratchpad removed, then the text between `<code>` and
/// `</code>` (to the end when the closing tag is missing: generation may stop early), or
/// the whole answer when there is no tag. The flag says whether a `<code>` tag was found.
pub fn extract_code(answer: &str) -> (String, bool) {
    let visible = strip_scratchpad(answer);
    match visible.find("<code>") {
        Some(open) => {
            let rest = &visible[open + "<code>".len()..];
            let body = rest.find("</code>").map_or(rest, |close| &rest[..close]);
            (trim_blank_lines(body), true)
        }
        None => (trim_blank_lines(&visible), false),
    }
}

/// Drop leading and trailing blank lines but keep the first line's indentation.
fn trim_blank_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(lines.len());
    let end = lines.iter().rposition(|l| !l.trim().is_empty()).map_or(start, |e| e + 1);
    lines[start..end].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_code_variants() {
        assert_eq!(extract_code(" <scratchpad> 2024 </scratchpad> <code>\nx = 1\n</code>"), ("x = 1".into(), true));
        assert_eq!(extract_code("<code>\n    y = 2\nz"), ("    y = 2\nz".into(), true));
        assert_eq!(extract_code("x = 3"), ("x = 3".into(), false));
    }
}
