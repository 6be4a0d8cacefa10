//! Recursive-descent parser: tokens in, a checked syntax tree out. Besides the grammar it
//! enforces the rules a query must obey before it can run (aggregates only as SELECT columns,
//! non-aggregate columns of a grouped query must be GROUP BY paths, unique column names) and
//! caps nesting at [`MAX_DEPTH`] so that hostile input cannot exhaust the stack. No evaluation.
//!
//! Grammar (keywords case-insensitive):
//! ```text
//! query      = SELECT [TOP int] ( '*' | column {',' column} ) FROM source
//!              [WHERE expr] [GROUP BY path {',' path}]
//! column     = ( aggregate | expr ) [AS name]
//! aggregate  = COUNT '(' ['*'] ')' | (SUM|AVG|MIN|MAX) '(' expr ')'
//! source     = devices | devices.modules | devices.jobs
//! expr       = and {OR and}
//! and        = not {AND not}
//! not        = NOT not | comparison
//! comparison = additive [ cmp additive | [NOT] IN list | NIN list ]
//! additive   = term {('+'|'-') term}
//! term       = unary {('*'|'/'|'%') unary}
//! unary      = ('-'|'+') unary | primary
//! primary    = literal | path | function '(' [expr {',' expr}] ')' | '(' expr ')'
//! path       = name { '.' name | '[' string ']' | '[' int ']' }
//! list       = '[' [expr {',' expr}] ']' | '(' [expr {',' expr}] ')'
//! ```

use serde_json::Value;

use super::lexer::{tokenize, Token, TokenKind};
use super::{QueryError, Source};

/// How deeply expressions may nest (parentheses, NOT, unary minus, operator chains).
pub(crate) const MAX_DEPTH: usize = 64;

/// Words that cannot start a path (they may still appear after a dot: `tags.from`).
const RESERVED: &[&str] = &[
    "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "NIN", "TOP", "AS", "GROUP", "BY", "TRUE",
    "FALSE", "NULL",
];

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Segment {
    /// An object member, matched case-sensitively.
    Key(String),
    /// An array element.
    Index(usize),
}

/// A property path such as `properties.reported.connectivity.type`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Path {
    pub(crate) segments: Vec<Segment>,
}

impl Path {
    /// The output name a projection of this path gets without `AS`: its last member name.
    fn default_name(&self) -> Option<&str> {
        match self.segments.last() {
            Some(Segment::Key(name)) => Some(name),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// Built-in scalar functions (names are case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    IsDefined,
    IsNull,
    IsString,
    IsNumber,
    IsBool,
    IsObject,
    IsArray,
    StartsWith,
    EndsWith,
    Contains,
}

impl Func {
    fn lookup(name: &str) -> Option<(Func, usize)> {
        let upper = name.to_ascii_uppercase();
        let found = match upper.as_str() {
            "IS_DEFINED" => (Func::IsDefined, 1),
            "IS_NULL" => (Func::IsNull, 1),
            "IS_STRING" => (Func::IsString, 1),
            "IS_NUMBER" => (Func::IsNumber, 1),
            "IS_BOOL" => (Func::IsBool, 1),
            "IS_OBJECT" => (Func::IsObject, 1),
            "IS_ARRAY" => (Func::IsArray, 1),
            "STARTSWITH" => (Func::StartsWith, 2),
            "ENDSWITH" => (Func::EndsWith, 2),
            "CONTAINS" => (Func::Contains, 2),
            _ => return None,
        };
        Some(found)
    }
}

/// A scalar expression; conditions are expressions that should yield `true`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Literal(Value),
    Path(Path),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    In {
        negated: bool,
        value: Box<Expr>,
        list: Vec<Expr>,
    },
    Call(Func, Vec<Expr>),
}

/// An aggregate over the documents of a group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Aggregate {
    Count,
    Sum(Expr),
    Avg(Expr),
    Min(Expr),
    Max(Expr),
}

/// A column of a per-document projection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) expr: Expr,
}

/// A column of an aggregated (grouped) result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// The value of `group_by[index]`.
    Key {
        name: String,
        index: usize,
    },
    Agg {
        name: String,
        agg: Aggregate,
    },
}

/// What each result row is made of.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Select {
    /// `SELECT *`: the documents themselves.
    All,
    /// One row per matching document.
    Columns(Vec<Column>),
    /// One row per group (a single group when there is no GROUP BY).
    Aggregated {
        outputs: Vec<Output>,
        group_by: Vec<Path>,
    },
}

/// A parsed, checked query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ast {
    pub(crate) top: Option<usize>,
    pub(crate) select: Select,
    pub(crate) source: Source,
    pub(crate) condition: Option<Expr>,
}

/// A SELECT column before the grouping rules are checked.
struct RawColumn {
    name: Option<String>,
    pos: usize,
    item: RawItem,
}

enum RawItem {
    Expr(Expr),
    Agg(Aggregate),
}

/// Parses a whole query.
pub(crate) fn parse_query(text: &str) -> Result<Ast, QueryError> {
    let mut parser = Parser::new(text)?;
    let mut ast = parser.query()?;
    parser.expect_end()?;
    if ast.source == Source::DevicesJobs {
        // IoT Hub's documentation writes job-row paths in full (`devices.jobs.jobId`); rows
        // are the job objects themselves, so the collection prefix is dropped.
        strip_collection_prefix(&mut ast);
    }
    Ok(ast)
}

fn strip_collection_prefix(ast: &mut Ast) {
    if let Some(condition) = ast.condition.as_mut() {
        strip_in_expr(condition);
    }
    match &mut ast.select {
        Select::All => {}
        Select::Columns(columns) => columns.iter_mut().for_each(|c| strip_in_expr(&mut c.expr)),
        Select::Aggregated { outputs, group_by } => {
            group_by.iter_mut().for_each(strip_in_path);
            for output in outputs {
                if let Output::Agg { agg, .. } = output {
                    match agg {
                        Aggregate::Count => {}
                        Aggregate::Sum(e)
                        | Aggregate::Avg(e)
                        | Aggregate::Min(e)
                        | Aggregate::Max(e) => strip_in_expr(e),
                    }
                }
            }
        }
    }
}

fn strip_in_path(path: &mut Path) {
    let prefixed = matches!(
        path.segments.as_slice(),
        [Segment::Key(a), Segment::Key(b), _, ..] if a == "devices" && b == "jobs"
    );
    if prefixed {
        path.segments.drain(..2);
    }
}

fn strip_in_expr(expr: &mut Expr) {
    match expr {
        Expr::Literal(_) => {}
        Expr::Path(path) => strip_in_path(path),
        Expr::Neg(inner) | Expr::Not(inner) => strip_in_expr(inner),
        Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
            items.iter_mut().for_each(strip_in_expr)
        }
        Expr::Arith(_, a, b) | Expr::Compare(_, a, b) => {
            strip_in_expr(a);
            strip_in_expr(b);
        }
        Expr::In { value, list, .. } => {
            strip_in_expr(value);
            list.iter_mut().for_each(strip_in_expr);
        }
    }
}

/// Parses a bare condition (the part after WHERE).
pub(crate) fn parse_condition(text: &str) -> Result<Expr, QueryError> {
    let mut parser = Parser::new(text)?;
    if parser.peek().kind == TokenKind::End {
        return Err(QueryError::new("the condition is empty"));
    }
    let expr = parser.expr()?;
    parser.expect_end()?;
    Ok(expr)
}

struct Parser {
    tokens: Vec<Token>,
    next: usize,
    depth: usize,
}

impl Parser {
    fn new(text: &str) -> Result<Self, QueryError> {
        Ok(Parser {
            tokens: tokenize(text)?,
            next: 0,
            depth: 0,
        })
    }

    // ----- token helpers -----

    fn peek(&self) -> &Token {
        // `tokenize` always ends with End and `advance` never moves past it.
        &self.tokens[self.next.min(self.tokens.len() - 1)]
    }

    fn peek_at(&self, ahead: usize) -> &Token {
        &self.tokens[(self.next + ahead).min(self.tokens.len() - 1)]
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokenKind::End {
            self.next += 1;
        }
        token
    }

    /// The token just consumed, for "after 'X'" in messages.
    fn previous(&self) -> Option<&Token> {
        self.next.checked_sub(1).and_then(|i| self.tokens.get(i))
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        is_keyword(self.peek(), keyword)
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        if self.at_keyword(keyword) {
            self.advance();
            true
        } else {
            false
        }
    }

    fn eat(&mut self, kind: &TokenKind) -> bool {
        if &self.peek().kind == kind {
            self.advance();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, kind: &TokenKind, what: &str) -> Result<Token, QueryError> {
        if &self.peek().kind == kind {
            Ok(self.advance())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), QueryError> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            Err(self.unexpected(keyword))
        }
    }

    fn expect_end(&self) -> Result<(), QueryError> {
        let token = self.peek();
        if token.kind == TokenKind::End {
            Ok(())
        } else {
            Err(QueryError::at(
                format!("unexpected {}", token.describe()),
                token.pos,
            ))
        }
    }

    /// "expected WHAT after 'PREV' but found TOKEN at position N".
    fn unexpected(&self, what: &str) -> QueryError {
        let token = self.peek();
        let after = match self.previous() {
            Some(prev) => format!(" after {}", prev.describe()),
            None => String::new(),
        };
        QueryError::at(
            format!("expected {what}{after} but found {}", token.describe()),
            token.pos,
        )
    }

    /// Enters one nesting level; the caller restores `self.depth` when done.
    fn descend(&mut self) -> Result<(), QueryError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(QueryError::at(
                format!("expression is nested too deeply (the limit is {MAX_DEPTH} levels)"),
                self.peek().pos,
            ));
        }
        Ok(())
    }

    // ----- query structure -----

    fn query(&mut self) -> Result<Ast, QueryError> {
        self.expect_keyword("SELECT")?;
        let top = if self.eat_keyword("TOP") {
            match self.peek().kind {
                TokenKind::Int(n) if n >= 0 => {
                    self.advance();
                    Some(usize::try_from(n).unwrap_or(usize::MAX))
                }
                _ => return Err(self.unexpected("a non-negative integer")),
            }
        } else {
            None
        };
        let star = self.peek().kind == TokenKind::Star;
        let columns = if star {
            self.advance();
            Vec::new()
        } else {
            let mut columns = vec![self.column()?];
            while self.eat(&TokenKind::Comma) {
                columns.push(self.column()?);
            }
            columns
        };
        self.expect_keyword("FROM")?;
        let source = self.source()?;
        let condition = if self.eat_keyword("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        let mut group_pos = 0;
        if self.at_keyword("GROUP") {
            group_pos = self.peek().pos;
            self.advance();
            self.expect_keyword("BY")?;
            group_by.push(self.group_path()?);
            while self.eat(&TokenKind::Comma) {
                group_by.push(self.group_path()?);
            }
        }
        let select = if star {
            if !group_by.is_empty() {
                return Err(QueryError::at(
                    "SELECT * cannot be combined with GROUP BY",
                    group_pos,
                ));
            }
            Select::All
        } else {
            build_select(columns, group_by)?
        };
        Ok(Ast {
            top,
            select,
            source,
            condition,
        })
    }

    fn source(&mut self) -> Result<Source, QueryError> {
        const EXPECTED: &str = "devices, devices.modules or devices.jobs";
        let token = self.peek().clone();
        if !is_keyword(&token, "devices") {
            return Err(self.unexpected(EXPECTED));
        }
        self.advance();
        if !self.eat(&TokenKind::Dot) {
            return Ok(Source::Devices);
        }
        let sub = self.peek().clone();
        let source = if is_keyword(&sub, "modules") {
            Source::DevicesModules
        } else if is_keyword(&sub, "jobs") {
            Source::DevicesJobs
        } else {
            return Err(QueryError::at(
                format!(
                    "unknown source after 'devices.': {} (expected {EXPECTED})",
                    sub.describe()
                ),
                sub.pos,
            ));
        };
        self.advance();
        Ok(source)
    }

    fn column(&mut self) -> Result<RawColumn, QueryError> {
        let pos = self.peek().pos;
        let item = match self.aggregate()? {
            Some(agg) => RawItem::Agg(agg),
            None => RawItem::Expr(self.expr()?),
        };
        let name = if self.eat_keyword("AS") {
            let token = self.peek().clone();
            match token.kind {
                TokenKind::Ident(alias) if !is_reserved(&alias) => {
                    self.advance();
                    Some(alias)
                }
                _ => return Err(self.unexpected("a column name")),
            }
        } else {
            None
        };
        Ok(RawColumn { name, pos, item })
    }

    /// An aggregate call if the next tokens are `COUNT(`, `SUM(` and so on.
    fn aggregate(&mut self) -> Result<Option<Aggregate>, QueryError> {
        let TokenKind::Ident(name) = &self.peek().kind else {
            return Ok(None);
        };
        if self.peek_at(1).kind != TokenKind::LParen {
            return Ok(None);
        }
        let upper = name.to_ascii_uppercase();
        if !is_aggregate_name(&upper) {
            return Ok(None);
        }
        self.advance();
        self.advance();
        if upper == "COUNT" {
            self.eat(&TokenKind::Star);
            self.expect(&TokenKind::RParen, "')' (COUNT takes no argument)")?;
            return Ok(Some(Aggregate::Count));
        }
        let arg = self.expr()?;
        self.expect(&TokenKind::RParen, "')'")?;
        Ok(Some(match upper.as_str() {
            "SUM" => Aggregate::Sum(arg),
            "AVG" => Aggregate::Avg(arg),
            "MIN" => Aggregate::Min(arg),
            _ => Aggregate::Max(arg),
        }))
    }

    fn group_path(&mut self) -> Result<(Path, usize), QueryError> {
        let token = self.peek().clone();
        match &token.kind {
            TokenKind::Ident(name) if !is_reserved(name) => {
                self.advance();
                Ok((self.path_rest(name.clone())?, token.pos))
            }
            _ => Err(self.unexpected("a property path")),
        }
    }

    // ----- expressions -----

    fn expr(&mut self) -> Result<Expr, QueryError> {
        let saved = self.depth;
        self.descend()?;
        let result = self.or_expr();
        self.depth = saved;
        result
    }

    fn or_expr(&mut self) -> Result<Expr, QueryError> {
        let mut terms = vec![self.and_expr()?];
        while self.eat_keyword("OR") {
            terms.push(self.and_expr()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and_expr(&mut self) -> Result<Expr, QueryError> {
        let mut terms = vec![self.not_expr()?];
        while self.eat_keyword("AND") {
            terms.push(self.not_expr()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn not_expr(&mut self) -> Result<Expr, QueryError> {
        if !self.eat_keyword("NOT") {
            return self.comparison();
        }
        let saved = self.depth;
        self.descend()?;
        let inner = self.not_expr();
        self.depth = saved;
        Ok(Expr::Not(Box::new(inner?)))
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.additive()?;
        let op = match self.peek().kind {
            TokenKind::Eq => Some(CmpOp::Eq),
            TokenKind::NotEq => Some(CmpOp::Ne),
            TokenKind::Lt => Some(CmpOp::Lt),
            TokenKind::Gt => Some(CmpOp::Gt),
            TokenKind::Le => Some(CmpOp::Le),
            TokenKind::Ge => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.advance();
            let right = self.additive()?;
            return Ok(Expr::Compare(op, Box::new(left), Box::new(right)));
        }
        let negated = if self.eat_keyword("IN") {
            false
        } else if self.eat_keyword("NIN") {
            true
        } else if self.at_keyword("NOT") && is_keyword(self.peek_at(1), "IN") {
            self.advance();
            self.advance();
            true
        } else {
            return Ok(left);
        };
        let list = self.list()?;
        Ok(Expr::In {
            negated,
            value: Box::new(left),
            list,
        })
    }

    fn list(&mut self) -> Result<Vec<Expr>, QueryError> {
        let close = match self.peek().kind {
            TokenKind::LBracket => TokenKind::RBracket,
            TokenKind::LParen => TokenKind::RParen,
            _ => return Err(self.unexpected("a list in '[ ]'")),
        };
        self.advance();
        let mut items = Vec::new();
        if self.eat(&close) {
            return Ok(items);
        }
        loop {
            items.push(self.expr()?);
            if self.eat(&close) {
                return Ok(items);
            }
            let closing = if close == TokenKind::RBracket {
                "',' or ']'"
            } else {
                "',' or ')'"
            };
            self.expect(&TokenKind::Comma, closing)?;
        }
    }

    fn additive(&mut self) -> Result<Expr, QueryError> {
        let saved = self.depth;
        let result = self.additive_chain();
        self.depth = saved;
        result
    }

    /// Each operator of a chain counts as a nesting level, since `a + b + c` nests to the left.
    fn additive_chain(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.term()?;
        loop {
            let op = match self.peek().kind {
                TokenKind::Plus => ArithOp::Add,
                TokenKind::Minus => ArithOp::Sub,
                _ => return Ok(left),
            };
            self.advance();
            self.descend()?;
            let right = self.term()?;
            left = Expr::Arith(op, Box::new(left), Box::new(right));
        }
    }

    fn term(&mut self) -> Result<Expr, QueryError> {
        let saved = self.depth;
        let result = self.term_chain();
        self.depth = saved;
        result
    }

    fn term_chain(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek().kind {
                TokenKind::Star => ArithOp::Mul,
                TokenKind::Slash => ArithOp::Div,
                TokenKind::Percent => ArithOp::Rem,
                _ => return Ok(left),
            };
            self.advance();
            self.descend()?;
            let right = self.unary()?;
            left = Expr::Arith(op, Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Expr, QueryError> {
        let negate = match self.peek().kind {
            TokenKind::Minus => true,
            TokenKind::Plus => false,
            _ => return self.primary(),
        };
        self.advance();
        let saved = self.depth;
        self.descend()?;
        let inner = self.unary();
        self.depth = saved;
        let inner = inner?;
        Ok(match inner {
            // Fold `-5` into a literal so that negative numbers are plain values.
            Expr::Literal(Value::Number(n)) if negate => match negate_number(&n) {
                Some(v) => Expr::Literal(v),
                None => Expr::Neg(Box::new(Expr::Literal(Value::Number(n)))),
            },
            other if negate => Expr::Neg(Box::new(other)),
            other => other,
        })
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        let token = self.peek().clone();
        match token.kind {
            TokenKind::Int(n) => {
                self.advance();
                Ok(Expr::Literal(Value::from(n)))
            }
            TokenKind::Float(x) => {
                self.advance();
                match serde_json::Number::from_f64(x) {
                    Some(n) => Ok(Expr::Literal(Value::Number(n))),
                    None => Err(QueryError::at("number out of range", token.pos)),
                }
            }
            TokenKind::Str(s) => {
                self.advance();
                Ok(Expr::Literal(Value::String(s)))
            }
            TokenKind::LParen => {
                self.advance();
                let inner = self.expr()?;
                self.expect(&TokenKind::RParen, "')'")?;
                Ok(inner)
            }
            TokenKind::Ident(name) => {
                let upper = name.to_ascii_uppercase();
                match upper.as_str() {
                    "TRUE" => return self.literal(Value::Bool(true)),
                    "FALSE" => return self.literal(Value::Bool(false)),
                    "NULL" => return self.literal(Value::Null),
                    _ => {}
                }
                if self.peek_at(1).kind == TokenKind::LParen {
                    return self.call(&name, token.pos);
                }
                if is_reserved(&name) {
                    return Err(self.unexpected("a value"));
                }
                self.advance();
                Ok(Expr::Path(self.path_rest(name)?))
            }
            _ => Err(self.unexpected("a value")),
        }
    }

    fn literal(&mut self, value: Value) -> Result<Expr, QueryError> {
        self.advance();
        Ok(Expr::Literal(value))
    }

    fn call(&mut self, name: &str, pos: usize) -> Result<Expr, QueryError> {
        if is_aggregate_name(&name.to_ascii_uppercase()) {
            return Err(QueryError::at(
                format!(
                    "aggregate {} is only allowed as a SELECT column",
                    name.to_ascii_uppercase()
                ),
                pos,
            ));
        }
        let Some((func, arity)) = Func::lookup(name) else {
            return Err(QueryError::at(format!("unknown function '{name}'"), pos));
        };
        self.advance();
        self.advance();
        let mut args = Vec::new();
        if !self.eat(&TokenKind::RParen) {
            loop {
                args.push(self.expr()?);
                if self.eat(&TokenKind::RParen) {
                    break;
                }
                self.expect(&TokenKind::Comma, "',' or ')'")?;
            }
        }
        if args.len() != arity {
            let plural = if arity == 1 { "" } else { "s" };
            return Err(QueryError::at(
                format!(
                    "{} takes {arity} argument{plural}, not {}",
                    name.to_ascii_uppercase(),
                    args.len()
                ),
                pos,
            ));
        }
        Ok(Expr::Call(func, args))
    }

    /// The rest of a path whose first name has been consumed.
    fn path_rest(&mut self, first: String) -> Result<Path, QueryError> {
        let mut segments = vec![Segment::Key(first)];
        loop {
            if self.eat(&TokenKind::Dot) {
                match self.peek().kind.clone() {
                    TokenKind::Ident(name) => {
                        self.advance();
                        segments.push(Segment::Key(name));
                    }
                    _ => return Err(self.unexpected("a property name")),
                }
            } else if self.peek().kind == TokenKind::LBracket {
                self.advance();
                match self.peek().kind.clone() {
                    TokenKind::Str(name) => segments.push(Segment::Key(name)),
                    TokenKind::Int(n) if n >= 0 => {
                        segments.push(Segment::Index(usize::try_from(n).unwrap_or(usize::MAX)))
                    }
                    _ => return Err(self.unexpected("a quoted property name or an array index")),
                }
                self.advance();
                self.expect(&TokenKind::RBracket, "']'")?;
            } else {
                return Ok(Path { segments });
            }
        }
    }
}

/// Applies the grouping rules and names every output column.
fn build_select(
    columns: Vec<RawColumn>,
    group_by: Vec<(Path, usize)>,
) -> Result<Select, QueryError> {
    let has_aggregate = columns.iter().any(|c| matches!(c.item, RawItem::Agg(_)));
    let mut names = Names::default();
    if !has_aggregate && group_by.is_empty() {
        let mut out = Vec::with_capacity(columns.len());
        for column in columns {
            let RawItem::Expr(expr) = column.item else {
                continue;
            };
            let name = names.claim(column.name, &expr, column.pos)?;
            out.push(Column { name, expr });
        }
        return Ok(Select::Columns(out));
    }
    let mut outputs = Vec::with_capacity(columns.len() + group_by.len());
    let mut projected = vec![false; group_by.len()];
    for column in columns {
        match column.item {
            RawItem::Agg(agg) => {
                let name = names.claim_unnamed(column.name, column.pos)?;
                outputs.push(Output::Agg { name, agg });
            }
            RawItem::Expr(expr) => {
                let index = match &expr {
                    Expr::Path(path) => group_by.iter().position(|(g, _)| g == path),
                    _ => None,
                };
                let Some(index) = index else {
                    let reason = if group_by.is_empty() {
                        "must be an aggregate (COUNT, SUM, AVG, MIN, MAX) when another column is one"
                    } else {
                        "must be an aggregate or a path listed in GROUP BY"
                    };
                    return Err(QueryError::at(format!("this column {reason}"), column.pos));
                };
                projected[index] = true;
                let name = names.claim(column.name, &expr, column.pos)?;
                outputs.push(Output::Key { name, index });
            }
        }
    }
    // Group paths that are not projected still appear in each row, named by their last segment.
    for (index, (path, pos)) in group_by.iter().enumerate() {
        if !projected[index] {
            let name = names.claim(None, &Expr::Path(path.clone()), *pos)?;
            outputs.push(Output::Key { name, index });
        }
    }
    Ok(Select::Aggregated {
        outputs,
        group_by: group_by.into_iter().map(|(path, _)| path).collect(),
    })
}

/// Hands out column names: the alias, else a path's last segment, else `$1`, `$2`, ...
#[derive(Default)]
struct Names {
    used: Vec<String>,
    unnamed: usize,
}

impl Names {
    fn claim(
        &mut self,
        alias: Option<String>,
        expr: &Expr,
        pos: usize,
    ) -> Result<String, QueryError> {
        let derived = match (&alias, expr) {
            (None, Expr::Path(path)) => path.default_name().map(str::to_string),
            _ => None,
        };
        self.claim_unnamed(alias.or(derived), pos)
    }

    fn claim_unnamed(&mut self, name: Option<String>, pos: usize) -> Result<String, QueryError> {
        let name = match name {
            Some(name) => name,
            None => {
                self.unnamed += 1;
                format!("${}", self.unnamed)
            }
        };
        if self.used.contains(&name) {
            return Err(QueryError::at(
                format!("duplicate column name '{name}' (use AS to rename)"),
                pos,
            ));
        }
        self.used.push(name.clone());
        Ok(name)
    }
}

fn is_keyword(token: &Token, keyword: &str) -> bool {
    matches!(&token.kind, TokenKind::Ident(name) if name.eq_ignore_ascii_case(keyword))
}

fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|kw| kw.eq_ignore_ascii_case(name))
}

fn is_aggregate_name(upper: &str) -> bool {
    matches!(upper, "COUNT" | "SUM" | "AVG" | "MIN" | "MAX")
}

fn negate_number(n: &serde_json::Number) -> Option<Value> {
    if let Some(i) = n.as_i64() {
        return i.checked_neg().map(Value::from);
    }
    n.as_f64()
        .and_then(|x| serde_json::Number::from_f64(-x))
        .map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(dotted: &str) -> Expr {
        Expr::Path(Path {
            segments: dotted
                .split('.')
                .map(|s| Segment::Key(s.to_string()))
                .collect(),
        })
    }

    fn lit(v: Value) -> Expr {
        Expr::Literal(v)
    }

    fn err(text: &str) -> String {
        parse_query(text).expect_err("should not parse").to_string()
    }

    #[test]
    fn precedence_or_and_not_comparison_arithmetic() {
        let e = parse_condition("a = 1 OR NOT b < 2 + 3 * 4 AND c").expect("parses");
        let expected = Expr::Or(vec![
            Expr::Compare(CmpOp::Eq, Box::new(path("a")), Box::new(lit(1.into()))),
            Expr::And(vec![
                Expr::Not(Box::new(Expr::Compare(
                    CmpOp::Lt,
                    Box::new(path("b")),
                    Box::new(Expr::Arith(
                        ArithOp::Add,
                        Box::new(lit(2.into())),
                        Box::new(Expr::Arith(
                            ArithOp::Mul,
                            Box::new(lit(3.into())),
                            Box::new(lit(4.into())),
                        )),
                    )),
                ))),
                path("c"),
            ]),
        ]);
        assert_eq!(e, expected);
    }

    #[test]
    fn keywords_are_case_insensitive_and_paths_keep_case() {
        let ast = parse_query("select top 2 * from Devices where Tags.X = TRUE or x in [NULL]")
            .expect("parses");
        assert_eq!(ast.top, Some(2));
        assert_eq!(ast.source, Source::Devices);
        let Some(Expr::Or(terms)) = ast.condition else {
            panic!("expected OR");
        };
        assert_eq!(
            terms[0],
            Expr::Compare(
                CmpOp::Eq,
                Box::new(path("Tags.X")),
                Box::new(lit(true.into()))
            )
        );
    }

    #[test]
    fn negative_numbers_are_literals() {
        assert_eq!(
            parse_condition("a > -5").expect("parses"),
            Expr::Compare(CmpOp::Gt, Box::new(path("a")), Box::new(lit((-5).into())))
        );
        assert_eq!(
            parse_condition("a > -2.5").expect("parses"),
            Expr::Compare(CmpOp::Gt, Box::new(path("a")), Box::new(lit((-2.5).into())))
        );
    }

    #[test]
    fn paths_with_dollar_brackets_and_keyword_segments() {
        let e = parse_condition("properties.desired.$version >= tags['my key'][0].from")
            .expect("parses");
        let Expr::Compare(CmpOp::Ge, left, right) = e else {
            panic!("expected >=");
        };
        assert_eq!(*left, path("properties.desired.$version"));
        assert_eq!(
            *right,
            Expr::Path(Path {
                segments: vec![
                    Segment::Key("tags".into()),
                    Segment::Key("my key".into()),
                    Segment::Index(0),
                    Segment::Key("from".into()),
                ]
            })
        );
    }

    #[test]
    fn sources() {
        for (text, source) in [
            ("devices", Source::Devices),
            ("devices.modules", Source::DevicesModules),
            ("DEVICES.JOBS", Source::DevicesJobs),
        ] {
            let ast = parse_query(&format!("SELECT * FROM {text}")).expect("parses");
            assert_eq!(ast.source, source);
        }
        assert_eq!(
            err("SELECT * FROM twins"),
            "expected devices, devices.modules or devices.jobs after 'FROM' but found 'twins' at position 15"
        );
        assert!(err("SELECT * FROM devices.things").contains("unknown source"));
    }

    #[test]
    fn column_names() {
        let ast =
            parse_query("SELECT deviceId, tags.location.plant AS p, version + 1 FROM devices")
                .expect("parses");
        let Select::Columns(columns) = ast.select else {
            panic!("expected columns");
        };
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["deviceId", "p", "$1"]);
        assert_eq!(
            err("SELECT tags.a.x, tags.b.x FROM devices"),
            "duplicate column name 'x' (use AS to rename) at position 18"
        );
    }

    #[test]
    fn group_by_plan() {
        let ast = parse_query(
            "SELECT properties.reported.connectivity.type AS t, COUNT() AS n FROM devices \
             GROUP BY properties.reported.connectivity.type, status",
        )
        .expect("parses");
        let Select::Aggregated { outputs, group_by } = ast.select else {
            panic!("expected aggregation");
        };
        assert_eq!(group_by.len(), 2);
        assert_eq!(
            outputs,
            vec![
                Output::Key {
                    name: "t".into(),
                    index: 0
                },
                Output::Agg {
                    name: "n".into(),
                    agg: Aggregate::Count
                },
                Output::Key {
                    name: "status".into(),
                    index: 1
                },
            ]
        );
    }

    #[test]
    fn grouping_rules() {
        assert_eq!(
            err("SELECT deviceId, COUNT() AS n FROM devices"),
            "this column must be an aggregate (COUNT, SUM, AVG, MIN, MAX) when another column is one at position 8"
        );
        assert!(err("SELECT deviceId, COUNT() FROM devices GROUP BY status")
            .contains("must be an aggregate or a path listed in GROUP BY"));
        assert!(err("SELECT * FROM devices GROUP BY status").contains("SELECT *"));
        assert_eq!(
            err("SELECT * FROM devices WHERE COUNT() > 1"),
            "aggregate COUNT is only allowed as a SELECT column at position 29"
        );
    }

    #[test]
    fn error_messages_name_token_and_position() {
        assert_eq!(
            err("SELECT * FROM devices WHERE deviceId = "),
            "expected a value after '=' but found end of query at position 40"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE deviceId = 'a' ORDER BY x"),
            "unexpected 'ORDER' at position 44"
        );
        assert_eq!(
            err("SELECT * devices"),
            "expected FROM after '*' but found 'devices' at position 10"
        );
        assert_eq!(
            err("SELECT TOP -1 * FROM devices"),
            "expected a non-negative integer after 'TOP' but found '-' at position 12"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE FOO(x)"),
            "unknown function 'FOO' at position 29"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE IS_DEFINED(a, b)"),
            "IS_DEFINED takes 1 argument, not 2 at position 29"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE a IN 'x'"),
            "expected a list in '[ ]' after 'IN' but found string 'x' at position 34"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE (a = 1"),
            "expected ')' after '1' but found end of query at position 35"
        );
        assert!(parse_condition("   ").is_err());
    }

    #[test]
    fn nesting_is_capped() {
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        let e = parse_condition(&deep).expect_err("too deep");
        assert!(e.to_string().contains("nested too deeply"), "{e}");
        let nots = format!("{}a", "NOT ".repeat(200));
        assert!(parse_condition(&nots).is_err());
        let negs = format!("{}1", "-".repeat(200));
        assert!(parse_condition(&negs).is_err());
        let chain = vec!["1"; 200].join(" + ");
        assert!(parse_condition(&chain).is_err());
        // Long AND/OR chains are flat, so they are fine.
        let ands = vec!["a = 1"; 500].join(" AND ");
        assert!(parse_condition(&ands).is_ok());
        // Moderate nesting is fine.
        let ok = format!("{}1{}", "(".repeat(30), ")".repeat(30));
        assert!(parse_condition(&ok).is_ok());
    }
}
