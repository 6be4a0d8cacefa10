//! Telemetry templates: a JSON file whose placeholders (`${seq}`, `${int(800,1200)}`, ...) make
//! each reading's body and application properties, for the agent (`[telemetry] template`) and
//! for the fleet (`--template`). The format is documented in `docs/telemetry-templates.md`.
//!
//! A [`Template`] is read and checked once: a file that is not JSON, or that names an unknown
//! placeholder or gives one bad arguments, is refused with its file, line and column. It is
//! immutable afterwards, so one `Arc<Template>` serves every device of a fleet. Each device
//! keeps a [`TemplateState`] (its random generator and the current value of each random walk:
//! a few dozen bytes) whose [`TemplateState::render`] cannot fail.
//!
//! It lives in `common` because the configuration parses it and the agent renders it. Reads
//! the template file in [`Template::load`]; imports only `protocol`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::protocol::property_bag::PropertyBag;

/// The placeholders, as the error for an unknown one lists them.
const KNOWN: &str = "deviceId, time, seq, int(min,max), float(min,max[,decimals]), \
                     walk(start,min,max,step[,decimals]), pick(a,b,...)";
/// Decimals of `float` and `walk` when not given.
const DEFAULT_DECIMALS: u8 = 2;
const MAX_DECIMALS: u8 = 9;

/// Why a template was refused. Each message starts with the file (and the line and column
/// where the position is known).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{}: cannot read it", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}, line {line}, column {column}: not valid JSON", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}, line {line}, column {column}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        problem: Problem,
    },
}

impl TemplateError {
    /// The line and column (both from 1) the error points at, when it points somewhere.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            TemplateError::Read { .. } => None,
            TemplateError::Json { line, column, .. }
            | TemplateError::Invalid { line, column, .. } => Some((*line, *column)),
        }
    }
}

/// What is wrong at a position of a template that is valid JSON.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("a template is a JSON object with \"body\" and optionally \"properties\"")]
    NotAnObject,
    #[error("the template has no \"body\"")]
    MissingBody,
    #[error("unknown key {0:?} (a template has \"body\" and \"properties\")")]
    UnknownKey(String),
    #[error("the key {0:?} is given twice")]
    DuplicateKey(String),
    #[error("\"properties\" must be an object of property names to string values")]
    PropertiesNotAnObject,
    #[error("the property {0:?} must have a string value (in quotes)")]
    PropertyNotAString(String),
    #[error("a property name must not be empty")]
    EmptyPropertyName,
    #[error(
        "the property name {0:?} is reserved (names starting with \"$\" or \"iothub-\" are \
         IoT Hub's)"
    )]
    ReservedPropertyName(String),
    #[error("placeholders are not expanded in keys ({0:?})")]
    PlaceholderInKey(String),
    #[error("unknown placeholder {0:?} (known: {KNOWN})")]
    UnknownPlaceholder(String),
    #[error("`${{` is not closed by `}}` (write `$${{` for a literal `${{`)")]
    Unclosed,
    #[error("{0}")]
    Syntax(&'static str),
    #[error("`${{{usage}}}`: {reason}")]
    Arguments { usage: &'static str, reason: String },
}

/// What a device sends for one reading: the JSON body and the application properties.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub body: Bytes,
    pub properties: PropertyBag,
}

/// A parsed and checked template; shared read-only by every device that uses it.
#[derive(Debug)]
pub struct Template {
    path: PathBuf,
    body: Node,
    /// Property names with their values (always strings).
    properties: Box<[Property]>,
    /// The start value of each `walk`, in file order.
    walk_starts: Box<[f64]>,
}

/// One part of the body, compiled.
#[derive(Debug)]
enum Node {
    /// JSON text of a part without placeholders, written as is.
    Json(Box<str>),
    /// A string that is exactly one placeholder: its typed value.
    Value(Gen),
    /// A string with placeholders inside: the text, as a JSON string.
    Text(Box<[Part]>),
    Array(Box<[Node]>),
    /// Keys as JSON text (quoted and escaped).
    Object(Box<[(Box<str>, Node)]>),
}

/// A property's name and its value (always a string).
type Property = (Box<str>, Box<[Part]>);

#[derive(Debug)]
enum Part {
    Literal(Box<str>),
    Gen(Gen),
}

/// One placeholder with its checked arguments.
#[derive(Debug)]
enum Gen {
    DeviceId,
    Time,
    Seq,
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
        decimals: u8,
    },
    Walk {
        index: usize,
        min: f64,
        max: f64,
        step: f64,
        decimals: u8,
    },
    Pick(Box<[Value]>),
}

impl Template {
    /// Reads and checks the template at `path`.
    pub fn load(path: &Path) -> Result<Template, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Template::parse(path, &text)
    }

    /// Checks the template `text`; `path` is only named in errors (and by [`Template::path`]).
    pub fn parse(path: &Path, text: &str) -> Result<Template, TemplateError> {
        // serde_json judges the syntax (and says where it is wrong); the reader below then
        // walks text known to be JSON, keeping where each string starts.
        if let Err(source) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            return Err(TemplateError::Json {
                path: path.to_path_buf(),
                line: source.line(),
                column: source.column(),
                source,
            });
        }
        let mut compiler = Compiler {
            path,
            text,
            walk_starts: Vec::new(),
        };
        let mut reader = Reader { text, pos: 0 };
        reader.ws();
        let top_at = reader.pos;
        let top = reader
            .value()
            .ok_or_else(|| compiler.error(reader.pos, Problem::Syntax("not valid JSON")))?;
        let Raw::Object(entries) = top else {
            return Err(compiler.error(top_at, Problem::NotAnObject));
        };
        compiler.no_duplicates(&entries)?;
        let mut body = None;
        let mut properties = Vec::new();
        for (key, value) in entries {
            match key.text.as_str() {
                "body" => body = Some(compiler.node(value)?),
                "properties" => properties = compiler.properties(key.start, value)?,
                _ => return Err(compiler.error(key.start, Problem::UnknownKey(key.text))),
            }
        }
        let body = body.ok_or_else(|| compiler.error(top_at, Problem::MissingBody))?;
        Ok(Template {
            path: path.to_path_buf(),
            body,
            properties: properties.into_boxed_slice(),
            walk_starts: compiler.walk_starts.into_boxed_slice(),
        })
    }

    /// The file the template was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One device's state for a template: its random generator and the current value of each walk.
pub struct TemplateState {
    template: Arc<Template>,
    rng: SmallRng,
    walks: Box<[f64]>,
}

impl fmt::Debug for TemplateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateState")
            .field("template", &self.template.path)
            .field("walks", &self.walks)
            .finish_non_exhaustive()
    }
}

impl TemplateState {
    /// A device's state: the same template and seed give the same readings.
    pub fn new(template: Arc<Template>, seed: u64) -> TemplateState {
        let walks = template.walk_starts.clone();
        TemplateState {
            template,
            rng: SmallRng::seed_from_u64(seed),
            walks,
        }
    }

    /// The body and properties of the reading `seq` of `device_id`, made at `time`.
    pub fn render(&mut self, device_id: &str, seq: u64, time: DateTime<Utc>) -> Rendered {
        let time = time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let TemplateState {
            template,
            rng,
            walks,
        } = self;
        let mut draw = Draw {
            rng,
            walks,
            device_id,
            seq,
            time: &time,
        };
        let mut body = String::with_capacity(256);
        draw.node(&template.body, &mut body);
        let mut properties = PropertyBag::new();
        for (name, parts) in template.properties.iter() {
            let mut value = String::new();
            draw.parts(parts, &mut value);
            properties.insert(name.as_ref(), value);
        }
        Rendered {
            body: Bytes::from(body),
            properties,
        }
    }
}

/// The renderer of one reading: what the placeholders take, and the device's mutable state.
struct Draw<'a> {
    rng: &'a mut SmallRng,
    walks: &'a mut [f64],
    device_id: &'a str,
    seq: u64,
    time: &'a str,
}

/// A placeholder's value, before it is written as JSON or as text.
enum Drawn<'a> {
    Str(&'a str),
    Int(i64),
    UInt(u64),
    Float(f64),
    Json(&'a Value),
}

impl<'a> Draw<'a> {
    fn node(&mut self, node: &'a Node, out: &mut String) {
        match node {
            Node::Json(text) => out.push_str(text),
            Node::Value(gen) => match self.gen(gen) {
                Drawn::Str(s) => push_json_string(out, s),
                Drawn::Json(value) => out.push_str(&value.to_string()),
                other => push_number(out, &other),
            },
            Node::Text(parts) => {
                let mut text = String::new();
                self.parts(parts, &mut text);
                push_json_string(out, &text);
            }
            Node::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.node(item, out);
                }
                out.push(']');
            }
            Node::Object(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(key);
                    out.push(':');
                    self.node(value, out);
                }
                out.push('}');
            }
        }
    }

    /// An interpolated string: strings as they are, other values as their JSON text.
    fn parts(&mut self, parts: &'a [Part], out: &mut String) {
        for part in parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Gen(gen) => match self.gen(gen) {
                    Drawn::Str(s) => out.push_str(s),
                    Drawn::Json(Value::String(s)) => out.push_str(s),
                    Drawn::Json(value) => out.push_str(&value.to_string()),
                    other => push_number(out, &other),
                },
            }
        }
    }

    fn gen(&mut self, gen: &'a Gen) -> Drawn<'a> {
        match gen {
            Gen::DeviceId => Drawn::Str(self.device_id),
            Gen::Time => Drawn::Str(self.time),
            Gen::Seq => Drawn::UInt(self.seq),
            Gen::Int { min, max } => Drawn::Int(self.rng.gen_range(*min..=*max)),
            Gen::Float { min, max, decimals } => {
                rounded(self.rng.gen_range(*min..=*max), *decimals)
            }
            Gen::Walk {
                index,
                min,
                max,
                step,
                decimals,
            } => {
                // The first reading has the start value; each later one moves at most `step`.
                let current = self.walks[*index];
                self.walks[*index] =
                    (current + self.rng.gen_range(-*step..=*step)).clamp(*min, *max);
                rounded(current, *decimals)
            }
            Gen::Pick(values) => Drawn::Json(&values[self.rng.gen_range(0..values.len())]),
        }
    }
}

/// `x` with `decimals` decimals; with none, a whole number.
fn rounded(x: f64, decimals: u8) -> Drawn<'static> {
    if decimals == 0 {
        return Drawn::Int(x.round() as i64);
    }
    let scale = 10f64.powi(i32::from(decimals));
    let round = (x * scale).round() / scale;
    // Near f64::MAX the scaled value overflows; such a value has no decimals to round anyway.
    Drawn::Float(if round.is_finite() { round } else { x })
}

fn push_number(out: &mut String, drawn: &Drawn<'_>) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = match drawn {
        Drawn::Int(n) => write!(out, "{n}"),
        Drawn::UInt(n) => write!(out, "{n}"),
        // Bounds are finite, so the value is: serde_json writes it as the shortest decimal
        // that reads back the same (21.5, not 21.500000000000004).
        Drawn::Float(x) => match serde_json::Number::from_f64(*x) {
            Some(number) => write!(out, "{number}"),
            None => write!(out, "null"),
        },
        Drawn::Str(_) | Drawn::Json(_) => Ok(()),
    };
}

/// `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---- Reading the file with positions ----

/// A JSON value with where each string starts in the file.
enum Raw {
    /// null, a boolean or a number.
    Scalar(Value),
    Str(Spanned),
    Array(Vec<Raw>),
    Object(Vec<(Spanned, Raw)>),
}

/// A decoded JSON string and where it came from.
struct Spanned {
    text: String,
    /// The file offset of the opening quote.
    start: usize,
    /// The file offset each byte of `text` was decoded from.
    at: Vec<usize>,
}

/// Walks text that serde_json has accepted; `None` only if that was not so.
struct Reader<'a> {
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        self.text.get(self.pos..).unwrap_or("")
    }

    fn ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r']).len();
    }

    fn eat(&mut self, c: char) -> bool {
        self.ws();
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Option<Raw> {
        self.ws();
        let rest = self.rest();
        match rest.chars().next()? {
            '{' => {
                self.pos += 1;
                let mut entries = Vec::new();
                if self.eat('}') {
                    return Some(Raw::Object(entries));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    if !self.eat(':') {
                        return None;
                    }
                    let value = self.value()?;
                    entries.push((key, value));
                    if self.eat('}') {
                        return Some(Raw::Object(entries));
                    }
                    if !self.eat(',') {
                        return None;
                    }
                }
            }
            '[' => {
                self.pos += 1;
                let mut items = Vec::new();
                if self.eat(']') {
                    return Some(Raw::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    if self.eat(']') {
                        return Some(Raw::Array(items));
                    }
                    if !self.eat(',') {
                        return None;
                    }
                }
            }
            '"' => self.string().map(Raw::Str),
            _ => {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
                    .unwrap_or(rest.len());
                let value = serde_json::from_str::<Value>(&rest[..len]).ok()?;
                self.pos += len;
                Some(Raw::Scalar(value))
            }
        }
    }

    /// A string literal at the current position, decoded, with the offset of each byte.
    fn string(&mut self) -> Option<Spanned> {
        let start = self.pos;
        let body = self.rest().strip_prefix('"')?;
        let mut text = String::new();
        let mut at = Vec::new();
        let mut chars = body.char_indices();
        let offset = start + 1;
        while let Some((i, c)) = chars.next() {
            let decoded = match c {
                '"' => {
                    self.pos = offset + i + 1;
                    return Some(Spanned { text, start, at });
                }
                '\\' => match chars.next()?.1 {
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'u' => {
                        let hex = |chars: &mut std::str::CharIndices<'_>| {
                            let digits: String = chars.by_ref().take(4).map(|(_, c)| c).collect();
                            u32::from_str_radix(&digits, 16).ok()
                        };
                        let unit = hex(&mut chars)?;
                        let code = if (0xD800..0xDC00).contains(&unit)
                            && body.get(i + 6..).is_some_and(|r| r.starts_with("\\u"))
                        {
                            chars.next();
                            chars.next();
                            let low = hex(&mut chars)?;
                            0x10000 + ((unit - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF)
                        } else {
                            unit
                        };
                        char::from_u32(code).unwrap_or('\u{FFFD}')
                    }
                    other => other,
                },
                c => c,
            };
            text.push(decoded);
            at.resize(text.len(), offset + i);
        }
        None
    }
}

// ---- Compiling ----

struct Compiler<'a> {
    path: &'a Path,
    text: &'a str,
    walk_starts: Vec<f64>,
}

impl Compiler<'_> {
    fn error(&self, offset: usize, problem: Problem) -> TemplateError {
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        TemplateError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            problem,
        }
    }

    fn no_duplicates(&self, entries: &[(Spanned, Raw)]) -> Result<(), TemplateError> {
        for (i, (key, _)) in entries.iter().enumerate() {
            if entries[..i].iter().any(|(k, _)| k.text == key.text) {
                return Err(self.error(key.start, Problem::DuplicateKey(key.text.clone())));
            }
        }
        Ok(())
    }

    fn node(&mut self, raw: Raw) -> Result<Node, TemplateError> {
        let node = match raw {
            Raw::Scalar(value) => Node::Json(value.to_string().into()),
            Raw::Str(s) => {
                let mut parts = self.parts(&s)?;
                match parts.as_slice() {
                    [Part::Gen(_)] => match parts.pop() {
                        Some(Part::Gen(gen)) => Node::Value(gen),
                        _ => unreachable!("matched one placeholder"),
                    },
                    _ if parts.iter().all(|p| matches!(p, Part::Literal(_))) => {
                        let mut json = String::new();
                        let text: String = parts
                            .iter()
                            .filter_map(|p| match p {
                                Part::Literal(t) => Some(&**t),
                                Part::Gen(_) => None,
                            })
                            .collect();
                        push_json_string(&mut json, &text);
                        Node::Json(json.into())
                    }
                    _ => Node::Text(parts.into_boxed_slice()),
                }
            }
            Raw::Array(items) => {
                let nodes = items
                    .into_iter()
                    .map(|item| self.node(item))
                    .collect::<Result<Vec<_>, _>>()?;
                if nodes.iter().all(|n| matches!(n, Node::Json(_))) {
                    let texts: Vec<&str> = nodes.iter().filter_map(json_text).collect();
                    Node::Json(format!("[{}]", texts.join(",")).into())
                } else {
                    Node::Array(nodes.into_boxed_slice())
                }
            }
            Raw::Object(entries) => {
                self.no_duplicates(&entries)?;
                let mut compiled = Vec::with_capacity(entries.len());
                for (key, value) in entries {
                    if key.text.contains("${") {
                        return Err(self.error(key.start, Problem::PlaceholderInKey(key.text)));
                    }
                    let mut json_key = String::new();
                    push_json_string(&mut json_key, &key.text);
                    compiled.push((json_key.into_boxed_str(), self.node(value)?));
                }
                if compiled.iter().all(|(_, n)| matches!(n, Node::Json(_))) {
                    let texts: Vec<String> = compiled
                        .iter()
                        .filter_map(|(k, n)| json_text(n).map(|t| format!("{k}:{t}")))
                        .collect();
                    Node::Json(format!("{{{}}}", texts.join(",")).into())
                } else {
                    Node::Object(compiled.into_boxed_slice())
                }
            }
        };
        Ok(node)
    }

    fn properties(&mut self, at: usize, raw: Raw) -> Result<Vec<Property>, TemplateError> {
        let Raw::Object(entries) = raw else {
            return Err(self.error(at, Problem::PropertiesNotAnObject));
        };
        self.no_duplicates(&entries)?;
        let mut properties = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            let lower = name.text.to_ascii_lowercase();
            if name.text.is_empty() {
                return Err(self.error(name.start, Problem::EmptyPropertyName));
            }
            if lower.starts_with('$') || lower.starts_with("iothub-") {
                return Err(self.error(name.start, Problem::ReservedPropertyName(name.text)));
            }
            if name.text.contains("${") {
                return Err(self.error(name.start, Problem::PlaceholderInKey(name.text)));
            }
            let Raw::Str(value) = value else {
                return Err(self.error(name.start, Problem::PropertyNotAString(name.text)));
            };
            let parts = self.parts(&value)?;
            properties.push((name.text.into_boxed_str(), parts.into_boxed_slice()));
        }
        Ok(properties)
    }

    /// The literal text and placeholders of a string; `$${` is a literal `${`.
    fn parts(&mut self, s: &Spanned) -> Result<Vec<Part>, TemplateError> {
        let text = s.text.as_str();
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        while let Some(found) = text[i..].find('$') {
            let dollar = i + found;
            literal.push_str(&text[i..dollar]);
            let rest = &text[dollar..];
            if rest.starts_with("$${") {
                literal.push_str("${");
                i = dollar + 3;
            } else if rest.starts_with("${") {
                let offset = s.at.get(dollar).copied().unwrap_or(s.start);
                let (gen, len) = self
                    .placeholder(rest)
                    .map_err(|problem| self.error(offset, problem))?;
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal).into()));
                }
                parts.push(Part::Gen(gen));
                i = dollar + len;
            } else {
                literal.push('$');
                i = dollar + 1;
            }
        }
        literal.push_str(&text[i..]);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into()));
        }
        Ok(parts)
    }

    /// The placeholder at the start of `s` (which starts with `${`) and its length.
    fn placeholder(&mut self, s: &str) -> Result<(Gen, usize), Problem> {
        let mut cursor = Cursor { s, i: 2 };
        cursor.ws();
        let name = cursor.ident();
        if name.is_empty() {
            return Err(if cursor.at_end() {
                Problem::Unclosed
            } else {
                Problem::Syntax("a placeholder name is expected after `${`")
            });
        }
        cursor.ws();
        let args = if cursor.eat('(') {
            cursor.args()?
        } else {
            Vec::new()
        };
        cursor.ws();
        if !cursor.eat('}') {
            return Err(if cursor.at_end() {
                Problem::Unclosed
            } else {
                Problem::Syntax("`}` is expected after the placeholder")
            });
        }
        Ok((self.gen(name, args)?, cursor.i))
    }

    fn gen(&mut self, name: &str, args: Vec<Value>) -> Result<Gen, Problem> {
        let gen = match name {
            "deviceId" => no_arguments("deviceId", &args, Gen::DeviceId)?,
            "time" => no_arguments("time", &args, Gen::Time)?,
            "seq" => no_arguments("seq", &args, Gen::Seq)?,
            "int" => {
                let a = Arguments::new("int(min, max)", &args, 2, 2)?;
                let (min, max) = (a.integer(0, "min")?, a.integer(1, "max")?);
                if min > max {
                    return Err(a.bad(format!("min ({min}) is more than max ({max})")));
                }
                Gen::Int { min, max }
            }
            "float" => {
                let a = Arguments::new("float(min, max[, decimals])", &args, 2, 3)?;
                let (min, max) = (a.number(0, "min")?, a.number(1, "max")?);
                if min >= max {
                    return Err(a.bad(format!("min ({min}) must be less than max ({max})")));
                }
                // The generator needs the span as a number; refused here, not a panic later.
                if !(max - min).is_finite() {
                    return Err(a.bad("the range is too wide".into()));
                }
                let decimals = a.decimals(2)?;
                Gen::Float { min, max, decimals }
            }
            "walk" => {
                let a = Arguments::new("walk(start, min, max, step[, decimals])", &args, 4, 5)?;
                let start = a.number(0, "start")?;
                let (min, max) = (a.number(1, "min")?, a.number(2, "max")?);
                let step = a.number(3, "step")?;
                if min >= max {
                    return Err(a.bad(format!("min ({min}) must be less than max ({max})")));
                }
                if !(min..=max).contains(&start) {
                    return Err(a.bad(format!("start ({start}) is outside {min}..={max}")));
                }
                if step <= 0.0 {
                    return Err(a.bad(format!("step ({step}) must be more than 0")));
                }
                if !(2.0 * step).is_finite() {
                    return Err(a.bad("the step is too large".into()));
                }
                let decimals = a.decimals(4)?;
                let index = self.walk_starts.len();
                self.walk_starts.push(start);
                Gen::Walk {
                    index,
                    min,
                    max,
                    step,
                    decimals,
                }
            }
            "pick" => {
                if args.is_empty() {
                    return Err(Problem::Arguments {
                        usage: "pick(a, b, ...)",
                        reason: "give at least one value".into(),
                    });
                }
                Gen::Pick(args.into_boxed_slice())
            }
            other => return Err(Problem::UnknownPlaceholder(other.to_string())),
        };
        Ok(gen)
    }
}

fn json_text(node: &Node) -> Option<&str> {
    match node {
        Node::Json(text) => Some(text),
        _ => None,
    }
}

fn no_arguments(name: &'static str, args: &[Value], gen: Gen) -> Result<Gen, Problem> {
    if args.is_empty() {
        Ok(gen)
    } else {
        Err(Problem::Arguments {
            usage: name,
            reason: "takes no arguments".into(),
        })
    }
}

/// The arguments of one placeholder, checked against its usage.
struct Arguments<'a> {
    usage: &'static str,
    args: &'a [Value],
}

impl<'a> Arguments<'a> {
    fn new(
        usage: &'static str,
        args: &'a [Value],
        least: usize,
        most: usize,
    ) -> Result<Arguments<'a>, Problem> {
        let a = Arguments { usage, args };
        if (least..=most).contains(&args.len()) {
            Ok(a)
        } else {
            let wanted = if least == most {
                format!("{least}")
            } else {
                format!("{least} or {most}")
            };
            Err(a.bad(format!("takes {wanted} arguments, got {}", args.len())))
        }
    }

    fn bad(&self, reason: String) -> Problem {
        Problem::Arguments {
            usage: self.usage,
            reason,
        }
    }

    fn number(&self, index: usize, what: &str) -> Result<f64, Problem> {
        self.args[index]
            .as_f64()
            .ok_or_else(|| self.bad(format!("{what} must be a number")))
    }

    fn integer(&self, index: usize, what: &str) -> Result<i64, Problem> {
        self.args[index]
            .as_i64()
            .ok_or_else(|| self.bad(format!("{what} must be a whole number")))
    }

    /// The optional `decimals` at `index`.
    fn decimals(&self, index: usize) -> Result<u8, Problem> {
        let Some(value) = self.args.get(index) else {
            return Ok(DEFAULT_DECIMALS);
        };
        value
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .filter(|n| *n <= MAX_DECIMALS)
            .ok_or_else(|| {
                self.bad(format!(
                    "decimals must be a whole number 0..={MAX_DECIMALS}"
                ))
            })
    }
}

/// Reads a placeholder's text.
struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        self.s.get(self.i..).unwrap_or("")
    }

    fn at_end(&self) -> bool {
        self.rest().is_empty()
    }

    fn ws(&mut self) {
        let rest = self.rest();
        self.i += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        if self.rest().starts_with(c) {
            self.i += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> &'a str {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        self.i += len;
        &rest[..len]
    }

    /// The arguments after `(`, through the closing `)`: numbers, `true`, `false`, `null`, and
    /// strings in single or double quotes (`\` escapes the next character).
    fn args(&mut self) -> Result<Vec<Value>, Problem> {
        let mut args = Vec::new();
        self.ws();
        if self.eat(')') {
            return Ok(args);
        }
        loop {
            self.ws();
            let rest = self.rest();
            match rest.chars().next() {
                None => return Err(Problem::Unclosed),
                Some(quote @ ('"' | '\'')) => {
                    self.i += 1;
                    let mut text = String::new();
                    let mut chars = self.rest().chars();
                    loop {
                        match chars.next() {
                            None => return Err(Problem::Unclosed),
                            Some(c) if c == quote => break,
                            Some('\\') => match chars.next() {
                                Some(c) => text.push(c),
                                None => return Err(Problem::Unclosed),
                            },
                            Some(c) => text.push(c),
                        }
                    }
                    self.i = self.s.len() - chars.as_str().len();
                    args.push(Value::String(text));
                }
                Some(_) => {
                    let len = rest
                        .find(|c: char| c == ',' || c == ')' || c == '}' || c.is_whitespace())
                        .unwrap_or(rest.len());
                    let token = &rest[..len];
                    match serde_json::from_str::<Value>(token) {
                        Ok(value @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => {
                            args.push(value);
                        }
                        _ => {
                            return Err(Problem::Syntax(
                                "an argument must be a number, true, false, null or a quoted \
                                 string",
                            ))
                        }
                    }
                    self.i += len;
                }
            }
            self.ws();
            if self.eat(')') {
                return Ok(args);
            }
            if !self.eat(',') {
                return Err(if self.at_end() {
                    Problem::Unclosed
                } else {
                    Problem::Syntax("`,` or `)` is expected after an argument")
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Template, TemplateError> {
        Template::parse(Path::new("t.json"), text)
    }

    fn state(text: &str, seed: u64) -> TemplateState {
        TemplateState::new(Arc::new(parse(text).expect("template parses")), seed)
    }

    fn time() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T12:34:56.789Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// The body of one reading as JSON.
    fn body(state: &mut TemplateState, seq: u64) -> Value {
        let rendered = state.render("door-07", seq, time());
        serde_json::from_slice(&rendered.body).expect("the body is JSON")
    }

    /// The problem and the line and column of a refused template.
    fn refused(text: &str) -> (Problem, usize, usize) {
        match parse(text) {
            Err(TemplateError::Invalid {
                problem,
                line,
                column,
                ..
            }) => (problem, line, column),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn device_id_time_and_seq_are_typed_when_alone_and_text_inside_a_string() {
        let mut s = state(
            r#"{"body": {"id": "${deviceId}", "at": "${time}", "n": "${seq}",
                "label": "${deviceId}/${seq} at ${time}", "fixed": [1, "two", null]}}"#,
            1,
        );
        let b = body(&mut s, 17);
        assert_eq!(b["id"], "door-07");
        assert_eq!(b["at"], "2026-03-01T12:34:56.789Z");
        assert_eq!(b["n"], 17, "a number, not a string: {b}");
        assert_eq!(b["label"], "door-07/17 at 2026-03-01T12:34:56.789Z");
        assert_eq!(b["fixed"], serde_json::json!([1, "two", null]));
    }

    #[test]
    fn int_and_float_stay_in_range_and_float_keeps_its_decimals() {
        let mut s = state(
            r#"{"body": {"i": "${int(800, 1200)}", "f": "${float(20.0,30.0)}",
                "f0": "${float(1, 5, 0)}", "t": "i=${int(1,1)}"}}"#,
            9,
        );
        let mut ints = std::collections::BTreeSet::new();
        for seq in 1..=500 {
            let b = body(&mut s, seq);
            let i = b["i"].as_i64().expect("an integer");
            assert!((800..=1200).contains(&i), "{b}");
            ints.insert(i);
            let f = b["f"].as_f64().expect("a number");
            assert!((20.0..=30.0).contains(&f), "{b}");
            assert_eq!((f * 100.0).round() / 100.0, f, "two decimals: {b}");
            assert!(b["f0"].is_i64(), "decimals 0 is a whole number: {b}");
            assert_eq!(b["t"], "i=1");
        }
        assert!(ints.len() > 100, "values vary: {}", ints.len());
    }

    #[test]
    fn a_walk_starts_at_its_start_moves_by_at_most_step_and_stays_within_bounds() {
        let mut s = state(r#"{"body": {"w": "${walk(21.0, 15.0, 30.0, 0.5)}"}}"#, 3);
        let mut last = body(&mut s, 1)["w"].as_f64().unwrap();
        assert_eq!(last, 21.0);
        let (mut low, mut high) = (last, last);
        for seq in 2..=20_000 {
            let w = body(&mut s, seq)["w"].as_f64().unwrap();
            assert!((15.0..=30.0).contains(&w), "{w}");
            assert!((w - last).abs() <= 0.5 + 1e-9, "{last} -> {w}");
            low = low.min(w);
            high = high.max(w);
            last = w;
        }
        assert!(low < 17.0 && high > 28.0, "it wanders: {low}..{high}");
    }

    #[test]
    fn each_walk_is_its_own_and_each_device_its_own() {
        let text = r#"{"body": ["${walk(0, -100, 100, 1)}", "${walk(50, -100, 100, 1)}"]}"#;
        let template = Arc::new(parse(text).unwrap());
        let mut a = TemplateState::new(template.clone(), 1);
        let mut b = TemplateState::new(template, 2);
        for seq in 1..=50 {
            let (x, y) = (body(&mut a, seq), body(&mut b, seq));
            assert!(x[1].as_f64().unwrap() > x[0].as_f64().unwrap());
            if seq > 1 {
                assert_ne!(x, y, "different seeds, different walks");
            }
        }
    }

    #[test]
    fn pick_takes_one_of_its_values_with_their_types() {
        let mut s = state(
            r#"{"body": {"s": "${pick(\"ok\", 'warn')}", "n": "${pick(1, 2.5, true, null)}",
                "t": "state=${pick('ok')}, n=${pick(3)}"}}"#,
            5,
        );
        let mut seen = std::collections::BTreeSet::new();
        for seq in 1..=200 {
            let b = body(&mut s, seq);
            seen.insert(b["s"].as_str().unwrap().to_string());
            let n = &b["n"];
            assert!(
                [
                    Value::from(1),
                    Value::from(2.5),
                    Value::Bool(true),
                    Value::Null
                ]
                .contains(n),
                "{b}"
            );
            assert_eq!(b["t"], "state=ok, n=3");
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["ok", "warn"]);
    }

    #[test]
    fn properties_are_strings_with_placeholders_interpolated() {
        let mut s = state(
            r#"{"body": {}, "properties": {"alert": "${pick('yes')}", "seq": "${seq}",
                "source": "sim-${deviceId}", "plain": "a \"quoted\" value"}}"#,
            1,
        );
        let rendered = s.render("door-07", 4, time());
        assert_eq!(rendered.body, Bytes::from("{}"));
        let p = &rendered.properties;
        assert_eq!(p.get("alert"), Some("yes"));
        assert_eq!(p.get("seq"), Some("4"));
        assert_eq!(p.get("source"), Some("sim-door-07"));
        assert_eq!(p.get("plain"), Some("a \"quoted\" value"));
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn the_same_seed_gives_the_same_readings() {
        let text = r#"{"body": {"i": "${int(0, 1000000)}", "f": "${float(0, 1, 6)}",
            "w": "${walk(5, 0, 10, 1)}", "p": "${pick('a','b','c')}"},
            "properties": {"x": "${int(0, 1000000)}"}}"#;
        let template = Arc::new(parse(text).unwrap());
        let run = |seed| {
            let mut s = TemplateState::new(template.clone(), seed);
            (1..=100)
                .map(|seq| s.render("d", seq, time()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn a_literal_dollar_brace_and_escapes_come_out_as_written() {
        let mut s = state(
            r#"{"body": {"cost": "$5 and $${seq}", "nl": "a\nb \u00e9 \ud83d\ude00", "q": "\"${seq}\""}}"#,
            1,
        );
        let b = body(&mut s, 8);
        assert_eq!(b["cost"], "$5 and ${seq}");
        assert_eq!(b["nl"], "a\nb é 😀");
        assert_eq!(b["q"], "\"8\"");
    }

    #[test]
    fn not_json_is_refused_with_serde_jsons_line_and_column() {
        let error = parse("{\n  \"body\": {\n    \"a\": 1,\n  }\n}").unwrap_err();
        assert!(matches!(error, TemplateError::Json { .. }), "{error:?}");
        assert_eq!(error.position(), Some((4, 3)));
        assert!(error
            .to_string()
            .starts_with("t.json, line 4, column 3: not valid JSON"));
    }

    #[test]
    fn an_unknown_placeholder_is_refused_at_its_dollar() {
        let text = "{\n  \"body\": {\n    \"a\": \"x ${seq} ${temperature}\"\n  }\n}";
        let (problem, line, column) = refused(text);
        assert_eq!(problem, Problem::UnknownPlaceholder("temperature".into()));
        assert_eq!((line, column), (3, 20));
        let message = parse(text).unwrap_err().to_string();
        assert!(
            message.starts_with("t.json, line 3, column 20: unknown placeholder \"temperature\""),
            "{message}"
        );
    }

    #[test]
    fn the_column_counts_what_is_in_the_file_not_the_decoded_string() {
        // `\u00e9` is six characters in the file and one in the string.
        let (problem, line, column) = refused(r#"{"body": "\u00e9\"${nope}"}"#);
        assert_eq!(problem, Problem::UnknownPlaceholder("nope".into()));
        assert_eq!((line, column), (1, 19));
    }

    #[test]
    fn bad_arguments_are_refused_with_the_usage() {
        let cases: [(&str, &str); 16] = [
            ("${float(-1e308, 1e308)}", "the range is too wide"),
            ("${walk(0, -1, 1, 1e308)}", "the step is too large"),
            ("${int(5, 3)}", "min (5) is more than max (3)"),
            ("${int(1.5, 3)}", "min must be a whole number"),
            ("${int(1)}", "takes 2 arguments, got 1"),
            ("${float(3, 3)}", "min (3) must be less than max (3)"),
            ("${float('a', 3)}", "min must be a number"),
            (
                "${float(1, 3, 12)}",
                "decimals must be a whole number 0..=9",
            ),
            ("${walk(40, 15, 30, 0.5)}", "start (40) is outside 15..=30"),
            ("${walk(20, 15, 30, 0)}", "step (0) must be more than 0"),
            ("${walk(20, 15, 30)}", "takes 4 or 5 arguments, got 3"),
            ("${pick()}", "give at least one value"),
            ("${seq(1)}", "takes no arguments"),
            ("${pick(ok)}", "an argument must be a number"),
            ("${int(1 2)}", "`,` or `)` is expected"),
            ("${seq", "is not closed"),
        ];
        for (placeholder, expected) in cases {
            let text = format!("{{\"body\": {{\"v\": \"{placeholder}\"}}}}");
            let (problem, line, column) = refused(&text);
            assert_eq!((line, column), (1, 17), "{placeholder}");
            let message = problem.to_string();
            assert!(message.contains(expected), "{placeholder}: {message}");
        }
        let (problem, _, _) = refused(r#"{"body": "${pick('a)}"}"#);
        assert_eq!(problem, Problem::Unclosed);
    }

    #[test]
    fn the_shape_of_the_file_is_checked_where_it_is_wrong() {
        assert_eq!(refused("[1]"), (Problem::NotAnObject, 1, 1));
        assert_eq!(
            refused("{\"properties\": {}}"),
            (Problem::MissingBody, 1, 1)
        );
        assert_eq!(
            refused("{\"body\": 1,\n \"extra\": 2}"),
            (Problem::UnknownKey("extra".into()), 2, 2)
        );
        assert_eq!(
            refused("{\"body\": {\"a\": 1, \"a\": 2}}"),
            (Problem::DuplicateKey("a".into()), 1, 19)
        );
        assert_eq!(
            refused("{\"body\": {}, \"properties\": [\"a\"]}"),
            (Problem::PropertiesNotAnObject, 1, 14)
        );
        assert_eq!(
            refused("{\"body\": {}, \"properties\": {\"n\": 5}}"),
            (Problem::PropertyNotAString("n".into()), 1, 29)
        );
        assert_eq!(
            refused("{\"body\": {}, \"properties\": {\"$.ct\": \"x\"}}"),
            (Problem::ReservedPropertyName("$.ct".into()), 1, 29)
        );
        assert_eq!(
            refused("{\"body\": {}, \"properties\": {\"IoTHub-x\": \"x\"}}"),
            (Problem::ReservedPropertyName("IoTHub-x".into()), 1, 29)
        );
        assert_eq!(
            refused("{\"body\": {\"${seq}\": 1}}"),
            (Problem::PlaceholderInKey("${seq}".into()), 1, 11)
        );
        assert_eq!(
            refused("{\"body\": {},\n \"properties\": {\"x\": \"${nope()}\"}}"),
            (Problem::UnknownPlaceholder("nope".into()), 2, 23)
        );
    }

    #[test]
    fn an_unreadable_file_names_it() {
        let error = Template::load(Path::new("/nonexistent/t.json")).unwrap_err();
        assert_eq!(error.to_string(), "/nonexistent/t.json: cannot read it");
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn extreme_bounds_render_finite_numbers() {
        let mut s = state(
            r#"{"body": ["${float(-1e307, 1e307)}", "${walk(1e308, -1e308, 1.7e308, 1e307)}",
                "${int(-9223372036854775808, 9223372036854775807)}"]}"#,
            1,
        );
        for seq in 1..=100 {
            let b = body(&mut s, seq);
            assert!(b[0].as_f64().unwrap().abs() <= 1e307, "{b}");
            assert!(b[1].is_f64() && b[2].is_i64(), "{b}");
        }
    }

    #[test]
    fn the_per_device_state_is_small() {
        let s = state(r#"{"body": "${walk(1, 0, 2, 1)}"}"#, 1);
        assert!(
            std::mem::size_of_val(&s) <= 64,
            "{}",
            std::mem::size_of_val(&s)
        );
    }
}
