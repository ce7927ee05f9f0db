//! The built-in analyzer's rules: one check per sink or pattern of the eight CWEs (SQL,
//! shell, HTML and templates, file paths, deserialization, file modes, credentials,
//! incomplete validation), each asking the syntax-tree context what reaches it.

use tree_sitter::Node;

use super::context::{children, last_segment, named_children, unparen, Ctx};

const CRED_WORDS: &[&str] =
    &["password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "access_key", "private_key", "auth_key", "credential"];
const CRED_EXCLUDE_SUFFIXES: &[&str] =
    &["_url", "_uri", "_env", "_var", "_name", "_field", "_file", "_path", "_len", "_length", "_type", "_header", "_prompt", "_label"];

fn is_cred_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    CRED_WORDS.iter().any(|w| n.contains(w)) && !CRED_EXCLUDE_SUFFIXES.iter().any(|s| n.ends_with(s)) && n != "token_type"
}

/// "example.com", "https://example.com": a host name (letters in the last label).
fn host_like(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(&s).to_string();
    let s = s.trim_end_matches('/');
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && labels.last().is_some_and(|t| t.len() >= 2 && t.chars().all(|c| c.is_ascii_alphabetic()))
}

impl<'t> Ctx<'t> {
    // ---- the rules ------------------------------------------------------------------------

    pub(super) fn run(&self) {
        for n in self.all_nodes() {
            match n.kind() {
                "call" => self.check_call(n),
                "return_statement" => {
                    if let Some(v) = n.named_child(0) {
                        self.check_html(v, n);
                    }
                }
                "assignment" => self.check_cred_assignment(n),
                "keyword_argument" => {
                    if let (Some(k), Some(v)) = (n.child_by_field_name("name"), n.child_by_field_name("value")) {
                        if is_cred_name(self.text(k)) && self.secret_literal(v) {
                            self.flag(
                                n,
                                798,
                                "hardcoded-credential",
                                format!("credential argument `{}` is a string literal", self.text(k)),
                            );
                        }
                    }
                }
                "pair" => {
                    if let (Some(k), Some(v)) = (n.child_by_field_name("key"), n.child_by_field_name("value")) {
                        if self.literal_str(k, 0).is_some_and(|s| is_cred_name(&s)) && self.secret_literal(v) {
                            self.flag(n, 798, "hardcoded-credential", "credential stored as a string literal");
                        }
                    }
                }
                "comparison_operator" => self.check_comparison(n),
                _ => {}
            }
        }
    }

    fn secret_literal(&self, n: Node<'t>) -> bool {
        let n = unparen(n);
        matches!(n.kind(), "string" | "concatenated_string")
            && self.literal_str(n, 0).is_some_and(|s| !s.is_empty() && s.len() <= 200 && !s.contains(char::is_whitespace))
    }

    fn check_cred_assignment(&self, n: Node<'t>) {
        let (Some(l), Some(r)) = (n.child_by_field_name("left"), n.child_by_field_name("right")) else {
            return;
        };
        let name = match l.kind() {
            "identifier" => self.text(l).to_string(),
            "attribute" => l.child_by_field_name("attribute").map(|a| self.text(a).to_string()).unwrap_or_default(),
            "subscript" => l.child_by_field_name("subscript").and_then(|s| self.literal_str(s, 0)).unwrap_or_default(),
            _ => return,
        };
        if is_cred_name(&name) && self.secret_literal(r) {
            self.flag(n, 798, "hardcoded-credential", format!("`{name}` is assigned a string literal"));
        }
    }

    fn check_comparison(&self, n: Node<'t>) {
        let kids = children(n);
        let ops: Vec<&str> = kids.iter().filter(|c| !c.is_named()).map(|c| self.text(*c)).collect();
        let operands: Vec<Node<'t>> = kids.into_iter().filter(|c| c.is_named()).collect();
        if operands.len() != 2 {
            return;
        }
        let (a, b) = (operands[0], operands[1]);
        if ops.iter().any(|o| matches!(*o, "==" | "!=")) {
            for (x, y) in [(a, b), (b, a)] {
                let x = unparen(x);
                let name = match x.kind() {
                    "identifier" => self.text(x),
                    "attribute" => x.child_by_field_name("attribute").map(|a| self.text(a)).unwrap_or(""),
                    _ => "",
                };
                if is_cred_name(name) && self.secret_literal(y) {
                    self.flag(n, 798, "hardcoded-credential", format!("`{name}` is compared with a string literal"));
                    return;
                }
            }
        }
        if ops.contains(&"in") {
            if let Some(lit) = self.literal_str(a, 0) {
                if host_like(&lit)
                    && self.url_ish(b)
                    && !matches!(unparen(b).kind(), "list" | "tuple" | "set" | "dictionary")
                    && self.resolve_is_not_collection(b)
                {
                    self.flag(
                        n,
                        20,
                        "incomplete-url-substring-check",
                        format!("substring test for \"{lit}\" accepts any URL that merely contains it"),
                    );
                }
            }
        }
    }

    fn resolve_is_not_collection(&self, n: Node<'t>) -> bool {
        let n = unparen(n);
        if n.kind() != "identifier" {
            return true;
        }
        match self.resolve(n) {
            Some(r) => !matches!(unparen(r).kind(), "list" | "tuple" | "set" | "dictionary" | "list_comprehension" | "set_comprehension"),
            // An UPPER_CASE name is a constant collection (ALLOWED_HOSTS), not a URL.
            None => !self.is_const(n, 0),
        }
    }

    fn check_html(&self, v: Node<'t>, at: Node<'t>) {
        let Some(b) = self.built(v, 0) else { return };
        let lit = &b.literal;
        let has_tag = lit
            .char_indices()
            .any(|(i, c)| c == '<' && lit[i + 1..].chars().next().is_some_and(|d| d.is_ascii_alphabetic() || d == '/' || d == '!'));
        if has_tag && b.parts.iter().any(|p| !self.escaped(*p, 0)) {
            self.flag(at, 79, "html-unescaped", format!("HTML built by {} from unescaped input", b.how));
        }
    }

    fn check_call(&self, n: Node<'t>) {
        let Some(func) = n.child_by_field_name("function") else {
            return;
        };
        let q = self.qualname(func);
        let last = last_segment(&q).to_string();
        let args = n.child_by_field_name("arguments").map(named_children).unwrap_or_default();
        let pos: Vec<Node<'t>> =
            args.iter().copied().filter(|a| !matches!(a.kind(), "keyword_argument" | "list_splat" | "dictionary_splat")).collect();
        let kw = |name: &str| -> Option<Node<'t>> {
            args.iter()
                .filter(|a| a.kind() == "keyword_argument")
                .find(|a| a.child_by_field_name("name").is_some_and(|k| self.text(k) == name))
                .and_then(|a| a.child_by_field_name("value"))
        };
        let arg = |i: usize, name: &str| pos.get(i).copied().or_else(|| kw(name));

        // CWE-89: SQL built from run-time strings.
        if matches!(last.as_str(), "execute" | "executemany" | "executescript" | "read_sql" | "read_sql_query" | "raw")
            || q == "sqlalchemy.text"
        {
            if let Some(sql) = arg(0, "sql").or_else(|| kw("query")) {
                if let Some(b) = self.built(sql, 0) {
                    if b.parts.iter().any(|p| !self.is_const(*p, 0)) {
                        self.flag(n, 89, "sql-built-string", format!("SQL query built by {} passed to {last}()", b.how));
                    }
                }
            }
        }

        // CWE-78: shell commands from run-time strings.
        let shell_fns = [
            "os.system",
            "os.popen",
            "os.popen2",
            "os.popen3",
            "os.popen4",
            "subprocess.getoutput",
            "subprocess.getstatusoutput",
            "commands.getoutput",
            "commands.getstatusoutput",
            "asyncio.create_subprocess_shell",
        ];
        if shell_fns.contains(&q.as_str()) {
            if let Some(cmd) = arg(0, "cmd").or_else(|| kw("command")) {
                if let Some(why) = self.shell_unsafe(cmd) {
                    self.flag(n, 78, "shell-injection", format!("{q}() runs a {why}"));
                }
            }
        }
        if q.starts_with("subprocess.")
            && matches!(last.as_str(), "run" | "call" | "check_call" | "check_output" | "Popen")
            && kw("shell").is_some_and(|s| self.text(s) == "True")
        {
            if let Some(why) = arg(0, "args").and_then(|cmd| self.shell_unsafe(cmd)) {
                self.flag(n, 78, "shell-injection", format!("{q}(shell=True) runs a {why}"));
            }
        }

        // CWE-79: templates and markup from run-time strings, responses with unescaped HTML.
        if last == "render_template_string" || q == "jinja2.Template" || q.ends_with("Markup") {
            if let Some(t) = arg(0, "source") {
                if !self.is_const(t, 0) && !self.escaped(t, 0) {
                    self.flag(n, 79, "template-from-input", format!("{last}() renders a template built at run time"));
                }
            }
        }
        if matches!(last.as_str(), "make_response" | "Response" | "HttpResponse") {
            if let Some(body) = arg(0, "response") {
                self.check_html(body, n);
            }
        }
        if q == "jinja2.Environment" && kw("autoescape").is_none_or(|a| self.text(a) == "False") {
            self.flag(n, 79, "jinja2-autoescape-off", "jinja2 Environment without autoescaping");
        }

        // CWE-22: files opened, sent or removed by a path built from user text.
        let path_sinks = [
            "open",
            "io.open",
            "codecs.open",
            "os.remove",
            "os.unlink",
            "os.rmdir",
            "shutil.rmtree",
            "shutil.copy",
            "shutil.copyfile",
            "shutil.move",
            "flask.send_file",
            "send_file",
        ];
        if path_sinks.contains(&q.as_str()) {
            if let Some(p) = arg(0, "file").or_else(|| kw("path")).or_else(|| kw("path_or_file")) {
                if self.path_risk(p, 0) && !self.has_path_guard(n) {
                    self.flag(n, 22, "path-traversal", format!("{q}() on a path joined from user input without a containment check"));
                }
            }
        }
        if last == "extractall" && kw("filter").is_none() && kw("members").is_none() && self.imports("tarfile") {
            self.flag(n, 22, "tar-extractall", "tarfile extractall() without a filter trusts member paths");
        }

        // CWE-502: deserializing untrusted bytes.
        let unsafe_loaders = [
            "pickle.loads",
            "pickle.load",
            "pickle.Unpickler",
            "cPickle.loads",
            "cPickle.load",
            "_pickle.loads",
            "_pickle.load",
            "dill.loads",
            "dill.load",
            "marshal.loads",
            "marshal.load",
            "shelve.open",
            "jsonpickle.decode",
            "yaml.unsafe_load",
            "yaml.unsafe_load_all",
            "pandas.read_pickle",
            "joblib.load",
        ];
        if unsafe_loaders.contains(&q.as_str()) {
            self.flag(n, 502, "unsafe-deserialization", format!("{q}() can run code embedded in the data"));
        }
        if q == "yaml.load" || q == "yaml.load_all" {
            let loader = arg(1, "Loader").map(|l| last_segment(self.text(l)).to_string());
            if !loader.as_deref().is_some_and(|l| matches!(l, "SafeLoader" | "CSafeLoader" | "BaseLoader")) {
                self.flag(n, 502, "unsafe-yaml-load", format!("{q}() without a safe Loader constructs arbitrary objects"));
            }
        }

        // CWE-732: world-writable modes.
        let mode = match q.as_str() {
            "os.chmod" | "os.lchmod" | "os.fchmod" => arg(1, "mode"),
            "os.open" => arg(2, "mode"),
            "os.mkdir" | "os.makedirs" => arg(1, "mode"),
            _ if last == "chmod" && !q.starts_with("os.") => arg(0, "mode"),
            _ => None,
        };
        if let Some(m) = mode.and_then(|m| self.mode_value(m, 0)) {
            if m & 0o002 != 0 {
                self.flag(n, 732, "world-writable-mode", format!("{q}() with mode {m:#o} lets every user write"));
            }
        }
        if q == "os.umask" {
            if let Some(m) = arg(0, "mask").and_then(|m| self.mode_value(m, 0)) {
                if m & 0o002 == 0 {
                    self.flag(n, 732, "permissive-umask", format!("umask {m:#o} leaves new files world-writable"));
                }
            }
        }

        // CWE-798: credentials passed as literals to login calls.
        if matches!(last.as_str(), "login" | "authenticate" | "auth") && pos.iter().skip(1).any(|a| self.secret_literal(*a)) {
            self.flag(n, 798, "hardcoded-credential", format!("{last}() called with a literal password"));
        }
        if let Some(a) = kw("auth") {
            let a = unparen(a);
            if a.kind() == "tuple" && named_children(a).get(1).is_some_and(|p| self.secret_literal(*p)) {
                self.flag(n, 798, "hardcoded-credential", "auth tuple with a literal password");
            }
        }

        // CWE-20: incomplete validation.
        if matches!(q.as_str(), "re.match" | "re.search" | "re.fullmatch" | "re.compile") {
            if let Some(pat) = arg(0, "pattern").and_then(|p| self.literal_str(p, 0)) {
                let ends = pat.ends_with('$') || pat.ends_with("\\Z") || pat.ends_with("\\z");
                let starts = pat.starts_with('^') || pat.starts_with("\\A");
                let incomplete = match q.as_str() {
                    "re.match" => !ends,
                    "re.search" => !(starts && ends),
                    _ => false,
                };
                if incomplete && q != "re.compile" && self.used_as_check(n) {
                    self.flag(n, 20, "unanchored-regex-check", format!("{q}() with an unanchored pattern accepts input with extra text"));
                }
                if unescaped_host_dot(&pat) {
                    self.flag(n, 20, "incomplete-hostname-regex", "unescaped '.' in a host name pattern matches any character");
                }
            }
        }
        if matches!(last.as_str(), "startswith" | "endswith") && func.kind() == "attribute" {
            let obj = func.child_by_field_name("object");
            if let (Some(obj), Some(lit)) = (obj, pos.first().and_then(|p| self.literal_str(*p, 0))) {
                if self.url_ish(obj) {
                    let bad = if last == "startswith" {
                        let rest = lit.strip_prefix("https://").or_else(|| lit.strip_prefix("http://")).or_else(|| lit.strip_prefix("//"));
                        rest.is_some_and(|r| !r.is_empty() && !r.contains('/'))
                    } else {
                        host_like(&lit) && !lit.starts_with('.') && !lit.starts_with('@')
                    };
                    if bad {
                        self.flag(n, 20, "incomplete-url-prefix-check", format!("{last}(\"{lit}\") also accepts look-alike hosts"));
                    }
                }
            }
        }
    }
}

/// A regex like `https?://www.example.com` where a '.' before a TLD is not escaped.
fn unescaped_host_dot(pat: &str) -> bool {
    let b = pat.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'.' && (i == 0 || b[i - 1] != b'\\') && i > 0 && b[i - 1].is_ascii_alphanumeric() {
            let tail: String = pat[i + 1..].chars().take_while(|c| c.is_ascii_alphabetic()).collect();
            if matches!(tail.as_str(), "com" | "org" | "net" | "io" | "edu" | "gov" | "co" | "dev" | "uk") {
                return true;
            }
        }
    }
    false
}
