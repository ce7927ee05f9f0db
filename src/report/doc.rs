//! A tiny document model with two renderers, so report.md and report.html always carry the
//! same content: the report is built once as a list of [`Block`]s and then rendered as
//! GitHub-flavoured Markdown (plots linked as files) and as one self-contained HTML page
//! (plots inlined as `<svg>`, simple embedded CSS, no external resources).
//!
//! Text given to the model is plain text: each renderer escapes what its format needs
//! (`|` in Markdown table cells, `<`, `>`, `&` and quotes in HTML).

/// A piece of inline text.
#[derive(Clone, Debug)]
pub enum Span {
    Text(String),
    /// Rendered as inline code.
    Code(String),
}

/// A block of the document.
#[derive(Clone, Debug)]
pub enum Block {
    /// Heading of level 1 to 3.
    Heading(u8, String),
    Para(Vec<Span>),
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// A plot: `path` relative to the report (Markdown links to it), `svg` the document
    /// (HTML inlines it), `caption` its alt text / caption.
    Figure {
        path: String,
        svg: String,
        caption: String,
    },
    List(Vec<String>),
    /// A collapsible code block: `summary` is the visible line, `lang` the fence language.
    Details {
        summary: String,
        lang: String,
        code: String,
    },
    /// A section written elsewhere in Markdown (e.g. the detectors'): Markdown output keeps
    /// it verbatim; HTML shows it preformatted, followed by its `figures` (path, svg) inlined.
    Markdown {
        markdown: String,
        figures: Vec<(String, String)>,
    },
}

/// Text on one line: newlines and tabs become spaces.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c == '\n' || c == '\r' || c == '\t' { ' ' } else { c }).collect()
}

fn md_cell(s: &str) -> String {
    let s = one_line(s).replace('|', "\\|");
    if s.trim().is_empty() {
        " ".to_string()
    } else {
        s
    }
}

/// Inline code in Markdown: a backtick fence longer than any backtick run inside.
fn md_code(s: &str) -> String {
    let s = one_line(s);
    let fence = "`".repeat(longest_run(&s, '`') + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') { " " } else { "" };
    format!("{fence}{pad}{s}{pad}{fence}")
}

fn longest_run(s: &str, ch: char) -> usize {
    let (mut best, mut cur) = (0, 0);
    for c in s.chars() {
        cur = if c == ch { cur + 1 } else { 0 };
        best = best.max(cur);
    }
    best
}

/// Renders the document as Markdown.
pub fn to_markdown(blocks: &[Block]) -> String {
    let mut out = String::new();
    for block in blocks {
        match block {
            Block::Heading(level, text) => {
                let hashes = "#".repeat((*level).clamp(1, 6) as usize);
                out.push_str(&format!("{hashes} {}\n\n", one_line(text)));
            }
            Block::Para(spans) => {
                for span in spans {
                    match span {
                        Span::Text(t) => out.push_str(t),
                        Span::Code(c) => out.push_str(&md_code(c)),
                    }
                }
                out.push_str("\n\n");
            }
            Block::Table { header, rows } => {
                let cells = |r: &[String]| r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | ");
                out.push_str(&format!("| {} |\n", cells(header)));
                out.push_str(&format!("|{}\n", "---|".repeat(header.len().max(1))));
                for row in rows {
                    out.push_str(&format!("| {} |\n", cells(row)));
                }
                out.push('\n');
            }
            Block::Markdown { markdown, .. } => {
                out.push_str(markdown.trim_end());
                out.push_str("\n\n");
            }
            Block::Figure { path, caption, .. } => {
                let alt = one_line(caption).replace(['[', ']'], "");
                out.push_str(&format!("![{alt}]({path})\n\n"));
            }
            Block::List(items) => {
                for item in items {
                    out.push_str(&format!("- {}\n", one_line(item)));
                }
                out.push('\n');
            }
            Block::Details { summary, lang, code } => {
                let fence = "`".repeat((longest_run(code, '`') + 1).max(3));
                out.push_str(&format!("<details><summary>{}</summary>\n\n", html_escape(&one_line(summary))));
                out.push_str(&format!("{fence}{lang}\n{}", code));
                if !code.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("{fence}\n\n</details>\n\n"));
            }
        }
    }
    out
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "\
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; max-width: 1000px; \
margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
code, pre { font-family: ui-monospace, 'SFMono-Regular', Menlo, Consolas, monospace; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; border-radius: 4px; }
figure { margin: 1.5em 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
details summary { cursor: pointer; font-weight: 600; }
";

/// Renders the document as one self-contained HTML page titled `title`.
pub fn to_html(title: &str, blocks: &[Block]) -> String {
    let mut out = String::new();
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str(&format!("<title>{}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n", html_escape(&one_line(title))));
    for block in blocks {
        match block {
            Block::Heading(level, text) => {
                let l = (*level).clamp(1, 6);
                out.push_str(&format!("<h{l}>{}</h{l}>\n", html_escape(text)));
            }
            Block::Para(spans) => {
                out.push_str("<p>");
                for span in spans {
                    match span {
                        Span::Text(t) => out.push_str(&html_escape(t)),
                        Span::Code(c) => out.push_str(&format!("<code>{}</code>", html_escape(c))),
                    }
                }
                out.push_str("</p>\n");
            }
            Block::Table { header, rows } => {
                out.push_str("<table>\n<thead><tr>");
                for h in header {
                    out.push_str(&format!("<th>{}</th>", html_escape(h)));
                }
                out.push_str("</tr></thead>\n<tbody>\n");
                for row in rows {
                    out.push_str("<tr>");
                    for c in row {
                        out.push_str(&format!("<td>{}</td>", html_escape(c)));
                    }
                    out.push_str("</tr>\n");
                }
                out.push_str("</tbody>\n</table>\n");
            }
            Block::Markdown { markdown, figures } => {
                out.push_str(&format!("<pre class=\"md\">{}</pre>\n", html_escape(markdown)));
                for (path, svg) in figures {
                    out.push_str(&format!("<figure id=\"{}\">\n", html_escape(path)));
                    out.push_str(strip_xml_prolog(svg));
                    out.push_str(&format!("\n<figcaption>{}</figcaption>\n</figure>\n", html_escape(path)));
                }
            }
            Block::Figure { path, svg, caption } => {
                out.push_str(&format!("<figure id=\"{}\">\n", html_escape(path)));
                out.push_str(strip_xml_prolog(svg));
                out.push_str(&format!("\n<figcaption>{}</figcaption>\n</figure>\n", html_escape(caption)));
            }
            Block::List(items) => {
                out.push_str("<ul>\n");
                for item in items {
                    out.push_str(&format!("<li>{}</li>\n", html_escape(item)));
                }
                out.push_str("</ul>\n");
            }
            Block::Details { summary, code, .. } => {
                out.push_str(&format!(
                    "<details>\n<summary>{}</summary>\n<pre><code>{}</code></pre>\n</details>\n",
                    html_escape(summary),
                    html_escape(code)
                ));
            }
        }
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// An inline `<svg>` must not carry an XML declaration; plotters does not write one, but
/// be safe.
fn strip_xml_prolog(svg: &str) -> &str {
    let s = svg.trim_start();
    if s.starts_with("<?xml") {
        if let Some(end) = s.find("?>") {
            return s[end + 2..].trim_start();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_escapes_table_cells_and_fences_code() {
        let blocks = vec![
            Block::Heading(2, "A\nB".into()),
            Block::Para(vec![Span::Text("see ".into()), Span::Code("a`b".into())]),
            Block::Table { header: vec!["x".into(), "y".into()], rows: vec![vec!["a|b".into(), "".into()]] },
            Block::Details { summary: "cfg".into(), lang: "toml".into(), code: "a = \"```\"".into() },
        ];
        let md = to_markdown(&blocks);
        assert!(md.contains("## A B\n"));
        assert!(md.contains("see ``a`b``"));
        assert!(md.contains("| x | y |\n|---|---|\n| a\\|b |   |\n"));
        assert!(md.contains("````toml\na = \"```\"\n````\n"));
        assert!(md.contains("<details><summary>cfg</summary>"));
    }

    #[test]
    fn html_escapes_everything_and_inlines_svg() {
        let blocks = vec![
            Block::Para(vec![Span::Text("<script>".into())]),
            Block::Table { header: vec!["h&".into()], rows: vec![vec!["1 -> 2".into()]] },
            Block::Figure { path: "plots/p.svg".into(), svg: "<?xml version=\"1.0\"?>\n<svg></svg>".into(), caption: "c".into() },
            Block::List(vec!["\"q\"".into()]),
        ];
        let html = to_html("T <x>", &blocks);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<title>T &lt;x&gt;</title>"));
        assert!(html.contains("<p>&lt;script&gt;</p>"));
        assert!(html.contains("<th>h&amp;</th>") && html.contains("<td>1 -&gt; 2</td>"));
        assert!(html.contains("<figure id=\"plots/p.svg\">\n<svg></svg>"));
        assert!(!html.contains("<?xml"));
        assert!(html.contains("<li>&quot;q&quot;</li>"));
        assert!(html.trim_end().ends_with("</html>"));
    }
}
