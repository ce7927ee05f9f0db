//! What the built-in analyzer knows about a syntax tree, for the rules to ask: same-function
//! assignments and import aliases (indexed once), name resolution, and how an expression's
//! value came about (a literal, a string built at run time, user input, an escaped or
//! shell-quoted value, a file path or mode).

use std::collections::HashMap;

use tree_sitter::Node;

use super::{Finding, BUILTIN};

/// How deep identifier resolution may recurse (it also stops `x = x + 1` cycles).
const MAX_DEPTH: usize = 6;

struct Assign<'t> {
    /// Start byte of the enclosing function, `usize::MAX` at module level.
    scope: usize,
    at: usize,
    rhs: Node<'t>,
}

/// Pieces of a string built at run time: its literal text and the expressions spliced in.
#[derive(Default)]
pub(super) struct Built<'t> {
    pub(super) literal: String,
    pub(super) parts: Vec<Node<'t>>,
    pub(super) how: &'static str,
}

pub(super) struct Ctx<'t> {
    src: &'t [u8],
    root: Node<'t>,
    assigns: HashMap<String, Vec<Assign<'t>>>,
    aliases: HashMap<String, String>,
    // A RefCell so rules can flag while holding shared borrows of the tree helpers.
    pub(super) findings: std::cell::RefCell<Vec<Finding>>,
}

const URL_WORDS: &[&str] = &[
    "url",
    "uri",
    "host",
    "origin",
    "email",
    "mail",
    "domain",
    "referer",
    "referrer",
    "site",
    "link",
    "redirect",
    "next",
    "target",
    "location",
    "callback",
    "return_to",
];
const ESCAPERS: &[&str] = &["escape", "escape_html", "quote", "quote_plus", "clean", "sanitize", "int", "float", "len", "urlencode"];
const PATH_SANITIZERS: &[&str] = &["basename", "secure_filename", "safe_join"];
const STAT_MODES: &[(&str, u32)] = &[
    ("S_IRWXU", 0o700),
    ("S_IRUSR", 0o400),
    ("S_IWUSR", 0o200),
    ("S_IXUSR", 0o100),
    ("S_IRWXG", 0o070),
    ("S_IRGRP", 0o040),
    ("S_IWGRP", 0o020),
    ("S_IXGRP", 0o010),
    ("S_IRWXO", 0o007),
    ("S_IROTH", 0o004),
    ("S_IWOTH", 0o002),
    ("S_IXOTH", 0o001),
    ("S_IREAD", 0o400),
    ("S_IWRITE", 0o200),
    ("S_IEXEC", 0o100),
];

pub(super) fn children<'t>(n: Node<'t>) -> Vec<Node<'t>> {
    (0..n.child_count()).filter_map(|i| n.child(i)).collect()
}

pub(super) fn named_children<'t>(n: Node<'t>) -> Vec<Node<'t>> {
    (0..n.named_child_count()).filter_map(|i| n.named_child(i as u32)).collect()
}

pub(super) fn unparen(mut n: Node<'_>) -> Node<'_> {
    while n.kind() == "parenthesized_expression" {
        match n.named_child(0) {
            Some(inner) => n = inner,
            None => break,
        }
    }
    n
}

pub(super) fn last_segment(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// Integer literal in any Python 2/3 notation.
fn parse_int(text: &str) -> Option<u32> {
    let t = text.replace('_', "").to_ascii_lowercase();
    let t = t.trim_end_matches('l');
    if let Some(o) = t.strip_prefix("0o") {
        u32::from_str_radix(o, 8).ok()
    } else if let Some(x) = t.strip_prefix("0x") {
        u32::from_str_radix(x, 16).ok()
    } else if let Some(b) = t.strip_prefix("0b") {
        u32::from_str_radix(b, 2).ok()
    } else if t.len() > 1 && t.starts_with('0') {
        u32::from_str_radix(&t[1..], 8).ok()
    } else {
        t.parse().ok()
    }
}

impl<'t> Ctx<'t> {
    pub(super) fn new(src: &'t [u8], root: Node<'t>) -> Self {
        let mut cx = Ctx { src, root, assigns: HashMap::new(), aliases: HashMap::new(), findings: Default::default() };
        cx.index(root);
        cx
    }

    pub(super) fn text(&self, n: Node<'_>) -> &'t str {
        n.utf8_text(self.src).unwrap_or("")
    }

    pub(super) fn all_nodes(&self) -> Vec<Node<'t>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root];
        while let Some(n) = stack.pop() {
            out.push(n);
            for c in children(n).into_iter().rev() {
                stack.push(c);
            }
        }
        out
    }

    fn scope_of(&self, n: Node<'_>) -> usize {
        let mut p = n.parent();
        while let Some(x) = p {
            if matches!(x.kind(), "function_definition" | "lambda") {
                return x.start_byte();
            }
            p = x.parent();
        }
        usize::MAX
    }

    fn enclosing_function(&self, n: Node<'t>) -> Option<Node<'t>> {
        let mut p = n.parent();
        while let Some(x) = p {
            if x.kind() == "function_definition" {
                return Some(x);
            }
            p = x.parent();
        }
        None
    }

    /// Record assignments and import aliases.
    fn index(&mut self, root: Node<'t>) {
        let mut stack = vec![root];
        while let Some(n) = stack.pop() {
            match n.kind() {
                "assignment" => {
                    if let (Some(l), Some(r)) = (n.child_by_field_name("left"), n.child_by_field_name("right")) {
                        if l.kind() == "identifier" {
                            let scope = self.scope_of(n);
                            self.assigns.entry(self.text(l).to_string()).or_default().push(Assign { scope, at: n.start_byte(), rhs: r });
                        }
                    }
                }
                "import_statement" => {
                    for c in named_children(n) {
                        if c.kind() == "aliased_import" {
                            if let (Some(name), Some(alias)) = (c.child_by_field_name("name"), c.child_by_field_name("alias")) {
                                self.aliases.insert(self.text(alias).to_string(), self.text(name).to_string());
                            }
                        }
                    }
                }
                "import_from_statement" => {
                    let module = n.child_by_field_name("module_name").map(|m| self.text(m).to_string()).unwrap_or_default();
                    for c in named_children(n) {
                        if n.child_by_field_name("module_name").is_some_and(|m| m.id() == c.id()) {
                            continue;
                        }
                        match c.kind() {
                            "dotted_name" => {
                                let name = self.text(c).to_string();
                                self.aliases.insert(name.clone(), format!("{module}.{name}"));
                            }
                            "aliased_import" => {
                                if let (Some(name), Some(alias)) = (c.child_by_field_name("name"), c.child_by_field_name("alias")) {
                                    self.aliases.insert(self.text(alias).to_string(), format!("{module}.{}", self.text(name)));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
            stack.extend(children(n));
        }
    }

    pub(super) fn imports(&self, module: &str) -> bool {
        self.aliases.values().any(|q| q == module || q.starts_with(&format!("{module}.")))
            || self.all_nodes().iter().any(|n| {
                n.kind() == "import_statement"
                    && named_children(*n).iter().any(|c| self.text(*c) == module || self.text(*c).starts_with(&format!("{module}.")))
            })
    }

    /// The expression last assigned to identifier `id` before it is used (same function
    /// first, then module level).
    pub(super) fn resolve(&self, id: Node<'t>) -> Option<Node<'t>> {
        let list = self.assigns.get(self.text(id))?;
        let scope = self.scope_of(id);
        let at = id.start_byte();
        let in_scope = list.iter().filter(|a| a.scope == scope && a.at < at).max_by_key(|a| a.at);
        let found = in_scope.or_else(|| {
            if scope == usize::MAX {
                return None;
            }
            list.iter().filter(|a| a.scope == usize::MAX).max_by_key(|a| a.at)
        });
        // An assignment whose right side contains the use itself (x = x + 1) would loop.
        found.map(|a| a.rhs).filter(|r| !(r.start_byte() <= at && at < r.end_byte()))
    }

    fn params(&self, func: Node<'t>) -> Vec<String> {
        let Some(ps) = func.child_by_field_name("parameters") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in named_children(ps) {
            let name = match p.kind() {
                "identifier" => Some(p),
                "default_parameter" | "typed_default_parameter" => p.child_by_field_name("name"),
                "typed_parameter" | "list_splat_pattern" | "dictionary_splat_pattern" => {
                    named_children(p).into_iter().find(|c| c.kind() == "identifier")
                }
                _ => None,
            };
            if let Some(n) = name {
                out.push(self.text(n).to_string());
            }
        }
        out
    }

    fn is_param(&self, id: Node<'t>) -> bool {
        self.enclosing_function(id).is_some_and(|f| self.params(f).iter().any(|p| p == self.text(id)))
    }

    /// Qualified name of a call target, with import aliases expanded
    /// (`from os import system as s; s(x)` -> "os.system").
    pub(super) fn qualname(&self, func: Node<'t>) -> String {
        let raw: String = self.text(func).chars().filter(|c| !c.is_whitespace()).collect();
        let (head, tail) = raw.split_once('.').map_or((raw.as_str(), ""), |(h, t)| (h, t));
        match self.aliases.get(head) {
            Some(q) if tail.is_empty() => q.clone(),
            Some(q) => format!("{q}.{tail}"),
            None => raw.clone(),
        }
    }

    fn line(n: Node<'_>) -> usize {
        n.start_position().row + 1
    }

    pub(super) fn flag(&self, n: Node<'_>, cwe: u32, rule: &str, message: impl Into<String>) {
        self.findings.borrow_mut().push(Finding {
            analyzer: BUILTIN.into(),
            cwe: Some(cwe),
            rule: rule.into(),
            line: Self::line(n),
            message: message.into(),
        });
    }

    // ---- expression classification -----------------------------------------------------

    /// The value of a string literal (concatenations included, identifiers followed);
    /// `None` when any part is computed at run time.
    pub(super) fn literal_str(&self, n: Node<'t>, depth: usize) -> Option<String> {
        let n = unparen(n);
        match n.kind() {
            "string" => {
                if named_children(n).iter().any(|c| c.kind() == "interpolation") {
                    return None;
                }
                Some(named_children(n).iter().filter(|c| c.kind() == "string_content").map(|c| self.text(*c)).collect())
            }
            "concatenated_string" => named_children(n).into_iter().map(|c| self.literal_str(c, depth)).collect(),
            "identifier" if depth < MAX_DEPTH => self.resolve(n).and_then(|r| self.literal_str(r, depth + 1)),
            _ => None,
        }
    }

    /// Known at write time: literals, tuples of literals, UPPER_CASE constants.
    pub(super) fn is_const(&self, n: Node<'t>, depth: usize) -> bool {
        let n = unparen(n);
        match n.kind() {
            "string" | "concatenated_string" => self.literal_str(n, depth).is_some(),
            "integer" | "float" | "true" | "false" | "none" => true,
            "tuple" | "list" => named_children(n).into_iter().all(|c| self.is_const(c, depth)),
            "binary_operator" => {
                n.child_by_field_name("left").is_some_and(|l| self.is_const(l, depth))
                    && n.child_by_field_name("right").is_some_and(|r| self.is_const(r, depth))
            }
            "identifier" => {
                if depth >= MAX_DEPTH {
                    return false;
                }
                match self.resolve(n) {
                    Some(r) => self.is_const(r, depth + 1),
                    None => {
                        let t = self.text(n);
                        !self.is_param(n) && t.chars().any(|c| c.is_ascii_uppercase()) && !t.chars().any(|c| c.is_ascii_lowercase())
                    }
                }
            }
            _ => false,
        }
    }

    /// If `n` builds a string at run time (f-string, `%`, `+`, `.format`, `.join`), its
    /// pieces; identifiers are followed to their assignment.
    pub(super) fn built(&self, n: Node<'t>, depth: usize) -> Option<Built<'t>> {
        let n = unparen(n);
        if depth > MAX_DEPTH {
            return None;
        }
        match n.kind() {
            "string" => {
                let interps: Vec<Node<'t>> = named_children(n).into_iter().filter(|c| c.kind() == "interpolation").collect();
                if interps.is_empty() {
                    return None;
                }
                let literal = named_children(n).iter().filter(|c| c.kind() == "string_content").map(|c| self.text(*c)).collect();
                let parts = interps.iter().filter_map(|i| i.child_by_field_name("expression")).collect();
                Some(Built { literal, parts, how: "an f-string" })
            }
            "concatenated_string" => {
                let mut b = Built { how: "an f-string", ..Default::default() };
                let mut any = false;
                for c in named_children(n) {
                    if let Some(x) = self.built(c, depth) {
                        any = true;
                        b.literal.push_str(&x.literal);
                        b.parts.extend(x.parts);
                    } else if let Some(s) = self.literal_str(c, depth) {
                        b.literal.push_str(&s);
                    }
                }
                any.then_some(b)
            }
            "binary_operator" => {
                let (l, r) = (n.child_by_field_name("left")?, n.child_by_field_name("right")?);
                let op = n.child_by_field_name("operator").map(|o| self.text(o)).unwrap_or("");
                match op {
                    "%" => {
                        let literal = self.literal_str(l, depth)?;
                        let r = unparen(r);
                        let parts = if r.kind() == "tuple" { named_children(r) } else { vec![r] };
                        Some(Built { literal, parts, how: "%-formatting" })
                    }
                    "+" => {
                        let mut b = Built { how: "string concatenation", ..Default::default() };
                        let mut stringy = false;
                        for side in [l, r] {
                            if let Some(s) = self.literal_str(side, depth) {
                                stringy = true;
                                b.literal.push_str(&s);
                            } else if let Some(x) = self.built(side, depth + 1) {
                                stringy = true;
                                b.literal.push_str(&x.literal);
                                b.parts.extend(x.parts);
                            } else {
                                b.parts.push(side);
                            }
                        }
                        stringy.then_some(b)
                    }
                    _ => None,
                }
            }
            "call" => {
                let f = n.child_by_field_name("function")?;
                if f.kind() != "attribute" {
                    return None;
                }
                let method = f.child_by_field_name("attribute").map(|a| self.text(a)).unwrap_or("");
                let obj = f.child_by_field_name("object")?;
                if !matches!(method, "format" | "join") {
                    return None;
                }
                let literal = self.literal_str(obj, depth)?;
                let args = n.child_by_field_name("arguments").map(named_children).unwrap_or_default();
                let parts = args
                    .into_iter()
                    .map(|a| if a.kind() == "keyword_argument" { a.child_by_field_name("value").unwrap_or(a) } else { a })
                    .collect();
                Some(Built { literal, parts, how: if method == "format" { "str.format" } else { "str.join" } })
            }
            "identifier" => self.resolve(n).and_then(|r| self.built(r, depth + 1)),
            _ => None,
        }
    }

    fn call_last(&self, n: Node<'t>) -> Option<String> {
        let n = unparen(n);
        (n.kind() == "call").then(|| n.child_by_field_name("function").map(|f| last_segment(&self.qualname(f)).to_string())).flatten()
    }

    /// The value reaches the sink escaped (escape(), html.escape(), int(), ...).
    pub(super) fn escaped(&self, n: Node<'t>, depth: usize) -> bool {
        let n = unparen(n);
        if self.is_const(n, depth) {
            return true;
        }
        if let Some(last) = self.call_last(n) {
            return ESCAPERS.contains(&last.as_str());
        }
        if n.kind() == "identifier" && depth < MAX_DEPTH {
            return self.resolve(n).is_some_and(|r| self.escaped(r, depth + 1));
        }
        false
    }

    /// Quoted for a shell (shlex.quote / pipes.quote) or constant.
    fn shell_quoted(&self, n: Node<'t>, depth: usize) -> bool {
        let n = unparen(n);
        if self.is_const(n, depth) {
            return true;
        }
        if let Some(last) = self.call_last(n) {
            return last == "quote";
        }
        if n.kind() == "identifier" && depth < MAX_DEPTH {
            return self.resolve(n).is_some_and(|r| self.shell_quoted(r, depth + 1));
        }
        false
    }

    /// A shell command string that can carry attacker text.
    pub(super) fn shell_unsafe(&self, n: Node<'t>) -> Option<String> {
        let n = unparen(n);
        if self.is_const(n, 0) || matches!(n.kind(), "list" | "tuple") {
            return None;
        }
        if let Some(b) = self.built(n, 0) {
            return b.parts.iter().any(|p| !self.shell_quoted(*p, 0)).then(|| format!("command built by {}", b.how));
        }
        if n.kind() == "identifier" {
            if let Some(r) = self.resolve(n) {
                if matches!(unparen(r).kind(), "list" | "tuple") || self.shell_quoted(r, 1) {
                    return None;
                }
            }
        }
        Some(format!("command from non-constant `{}`", self.text(n)))
    }

    /// Text that comes from the caller or the request (a parameter, `request.*`).
    fn user_input(&self, n: Node<'t>, depth: usize) -> bool {
        let n = unparen(n);
        if depth > MAX_DEPTH || self.is_const(n, depth) {
            return false;
        }
        match n.kind() {
            "identifier" => match self.resolve(n) {
                Some(r) => self.user_input(r, depth + 1),
                None => self.is_param(n) || self.qualname(n).contains("request"),
            },
            "attribute" | "subscript" => {
                let t = self.text(n);
                t.starts_with("request.")
                    || t.starts_with("flask.request")
                    || self.qualname(n).starts_with("flask.request")
                    || n.child_by_field_name("value")
                        .or_else(|| n.child_by_field_name("object"))
                        .is_some_and(|v| self.user_input(v, depth + 1))
            }
            "call" => {
                let Some(f) = n.child_by_field_name("function") else {
                    return false;
                };
                let q = self.qualname(f);
                if PATH_SANITIZERS.contains(&last_segment(&q)) {
                    return false;
                }
                if q.contains("request.") {
                    return true;
                }
                if f.kind() == "attribute" && f.child_by_field_name("object").is_some_and(|o| self.user_input(o, depth + 1)) {
                    return true;
                }
                n.child_by_field_name("arguments")
                    .map(named_children)
                    .unwrap_or_default()
                    .into_iter()
                    .any(|a| self.user_input(a, depth + 1))
            }
            "binary_operator" | "string" | "concatenated_string" => {
                self.built(n, depth).is_some_and(|b| b.parts.iter().any(|p| self.user_input(*p, depth + 1)))
            }
            _ => false,
        }
    }

    /// A file path assembled from a base and user text without a sanitizer.
    pub(super) fn path_risk(&self, n: Node<'t>, depth: usize) -> bool {
        let n = unparen(n);
        if depth > MAX_DEPTH {
            return false;
        }
        match n.kind() {
            "identifier" => self.resolve(n).is_some_and(|r| self.path_risk(r, depth + 1)),
            "call" => {
                let Some(f) = n.child_by_field_name("function") else {
                    return false;
                };
                let q = self.qualname(f);
                let last = last_segment(&q);
                let args = n.child_by_field_name("arguments").map(named_children).unwrap_or_default();
                match last {
                    _ if PATH_SANITIZERS.contains(&last) => false,
                    "join" if q.contains("path") || q == "join" => args.iter().skip(1).any(|a| self.user_input(*a, depth + 1)),
                    "realpath" | "abspath" | "normpath" | "Path" | "PurePath" | "expanduser" => {
                        args.first().is_some_and(|a| self.path_risk(*a, depth + 1))
                    }
                    _ => q.contains("request."),
                }
            }
            "binary_operator" => {
                let op = n.child_by_field_name("operator").map(|o| self.text(o)).unwrap_or("");
                if op == "/" {
                    return n.child_by_field_name("right").is_some_and(|r| self.user_input(r, depth + 1));
                }
                self.built(n, depth).is_some_and(|b| b.parts.iter().any(|p| self.user_input(*p, depth + 1)))
            }
            "string" | "concatenated_string" => {
                self.built(n, depth).is_some_and(|b| b.parts.iter().any(|p| self.user_input(*p, depth + 1)))
            }
            "attribute" | "subscript" => self.text(n).starts_with("request."),
            _ => false,
        }
    }

    /// The function checks the resolved path against its base (realpath + startswith,
    /// is_relative_to, commonpath) or rejects "..".
    pub(super) fn has_path_guard(&self, at: Node<'t>) -> bool {
        let scope = self.enclosing_function(at).unwrap_or(self.root);
        let mut normalises = false;
        let mut compares = false;
        let mut stack = vec![scope];
        while let Some(n) = stack.pop() {
            if n.kind() == "call" {
                if let Some(last) = self.call_last(n) {
                    normalises |= matches!(last.as_str(), "realpath" | "abspath" | "resolve" | "normpath");
                    compares |= matches!(last.as_str(), "startswith" | "is_relative_to" | "commonpath" | "commonprefix");
                }
            }
            if n.kind() == "comparison_operator" && (self.text(n).contains("\"..\"") || self.text(n).contains("'..'")) {
                return true;
            }
            stack.extend(children(n));
        }
        normalises && compares
    }

    /// A file mode, when it can be computed (integers, `stat.S_*`, `|` and `+`).
    pub(super) fn mode_value(&self, n: Node<'t>, depth: usize) -> Option<u32> {
        let n = unparen(n);
        if depth > MAX_DEPTH {
            return None;
        }
        match n.kind() {
            "integer" => parse_int(self.text(n)),
            "identifier" | "attribute" => {
                let last = last_segment(self.text(n));
                if let Some((_, v)) = STAT_MODES.iter().find(|(k, _)| *k == last) {
                    return Some(*v);
                }
                if n.kind() == "identifier" {
                    return self.resolve(n).and_then(|r| self.mode_value(r, depth + 1));
                }
                None
            }
            "binary_operator" => {
                let op = n.child_by_field_name("operator").map(|o| self.text(o)).unwrap_or("");
                let l = self.mode_value(n.child_by_field_name("left")?, depth + 1)?;
                let r = self.mode_value(n.child_by_field_name("right")?, depth + 1)?;
                match op {
                    "|" | "+" => Some(l | r),
                    "&" => Some(l & r),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The call's value is used as a yes/no check (if/elif/while condition, assert, return).
    pub(super) fn used_as_check(&self, n: Node<'t>) -> bool {
        let mut child = n;
        let mut p = n.parent();
        while let Some(x) = p {
            match x.kind() {
                "if_statement" | "elif_clause" | "while_statement" => {
                    return x.child_by_field_name("condition").is_some_and(|c| c.id() == child.id());
                }
                "assert_statement" | "return_statement" => return true,
                "block" | "module" | "expression_statement" | "function_definition" | "assignment" => return false,
                _ => {}
            }
            child = x;
            p = x.parent();
        }
        false
    }

    pub(super) fn url_ish(&self, n: Node<'t>) -> bool {
        let t = self.text(n).to_ascii_lowercase();
        URL_WORDS.iter().any(|w| t.contains(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_int("0o777"), Some(0o777));
        assert_eq!(parse_int("0777"), Some(0o777));
        assert_eq!(parse_int("511"), Some(511));
    }
}
