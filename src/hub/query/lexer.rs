//! Lexer for the IoT Hub query language: turns the query text into tokens, each tagged with
//! its 1-based character position so that parse errors can point at the offending spot.
//! Keywords are not recognised here (they are plain identifiers, matched case-insensitively by
//! the parser); this module knows only characters, numbers, strings and punctuation.

use super::QueryError;

/// What a token is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenKind {
    /// A name: keyword, function name, source name or path segment.
    Ident(String),
    /// An integer literal that fits in an `i64`.
    Int(i64),
    /// Any other number literal.
    Float(f64),
    /// A quoted string with its escapes resolved.
    Str(String),
    Dot,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Star,
    Plus,
    Minus,
    Slash,
    Percent,
    Eq,
    NotEq,
    Lt,
    Gt,
    Le,
    Ge,
    /// The end of the text; always the last token.
    End,
}

/// A token and where it starts (1-based character position).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) pos: usize,
}

impl Token {
    /// A short description of the token for error messages, e.g. `'WHERE'` or `end of query`.
    pub(crate) fn describe(&self) -> String {
        match &self.kind {
            TokenKind::Ident(name) => format!("'{name}'"),
            TokenKind::Int(n) => format!("'{n}'"),
            TokenKind::Float(x) => format!("'{x}'"),
            TokenKind::Str(s) => format!("string '{s}'"),
            TokenKind::End => "end of query".to_string(),
            punct => format!("'{}'", punct_text(punct)),
        }
    }
}

fn punct_text(kind: &TokenKind) -> &'static str {
    match kind {
        TokenKind::Dot => ".",
        TokenKind::Comma => ",",
        TokenKind::LParen => "(",
        TokenKind::RParen => ")",
        TokenKind::LBracket => "[",
        TokenKind::RBracket => "]",
        TokenKind::Star => "*",
        TokenKind::Plus => "+",
        TokenKind::Minus => "-",
        TokenKind::Slash => "/",
        TokenKind::Percent => "%",
        TokenKind::Eq => "=",
        TokenKind::NotEq => "!=",
        TokenKind::Lt => "<",
        TokenKind::Gt => ">",
        TokenKind::Le => "<=",
        TokenKind::Ge => ">=",
        TokenKind::Ident(_)
        | TokenKind::Int(_)
        | TokenKind::Float(_)
        | TokenKind::Str(_)
        | TokenKind::End => "",
    }
}

/// Splits `text` into tokens; the last one is always [`TokenKind::End`].
pub(crate) fn tokenize(text: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let (kind, next) = if is_ident_start(c) {
            let end = scan_while(&chars, i, is_ident_char);
            (TokenKind::Ident(chars[i..end].iter().collect()), end)
        } else if c.is_ascii_digit() {
            lex_number(&chars, i)?
        } else if c == '\'' || c == '"' {
            lex_string(&chars, i)?
        } else {
            let next_char = chars.get(i + 1).copied();
            match (c, next_char) {
                ('!', Some('=')) => (TokenKind::NotEq, i + 2),
                ('<', Some('>')) => (TokenKind::NotEq, i + 2),
                ('<', Some('=')) => (TokenKind::Le, i + 2),
                ('>', Some('=')) => (TokenKind::Ge, i + 2),
                ('<', _) => (TokenKind::Lt, i + 1),
                ('>', _) => (TokenKind::Gt, i + 1),
                ('=', _) => (TokenKind::Eq, i + 1),
                ('.', _) => (TokenKind::Dot, i + 1),
                (',', _) => (TokenKind::Comma, i + 1),
                ('(', _) => (TokenKind::LParen, i + 1),
                (')', _) => (TokenKind::RParen, i + 1),
                ('[', _) => (TokenKind::LBracket, i + 1),
                (']', _) => (TokenKind::RBracket, i + 1),
                ('*', _) => (TokenKind::Star, i + 1),
                ('+', _) => (TokenKind::Plus, i + 1),
                ('-', _) => (TokenKind::Minus, i + 1),
                ('/', _) => (TokenKind::Slash, i + 1),
                ('%', _) => (TokenKind::Percent, i + 1),
                _ => {
                    return Err(QueryError::at(
                        format!("unexpected character '{}'", c.escape_default()),
                        pos,
                    ))
                }
            }
        };
        tokens.push(Token { kind, pos });
        i = next;
    }
    tokens.push(Token {
        kind: TokenKind::End,
        pos: chars.len() + 1,
    });
    Ok(tokens)
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

fn scan_while(chars: &[char], start: usize, pred: fn(char) -> bool) -> usize {
    let mut end = start;
    while end < chars.len() && pred(chars[end]) {
        end += 1;
    }
    end
}

/// Digits, an optional fraction (`.` followed by a digit) and an optional exponent.
fn lex_number(chars: &[char], start: usize) -> Result<(TokenKind, usize), QueryError> {
    let is_digit = |c: char| c.is_ascii_digit();
    let digit_at = |i: usize| chars.get(i).is_some_and(|c| c.is_ascii_digit());
    let mut end = scan_while(chars, start, is_digit);
    let mut is_float = false;
    if chars.get(end) == Some(&'.') && digit_at(end + 1) {
        is_float = true;
        end = scan_while(chars, end + 1, is_digit);
    }
    if matches!(chars.get(end), Some('e' | 'E')) {
        let after_sign = if matches!(chars.get(end + 1), Some('+' | '-')) {
            end + 2
        } else {
            end + 1
        };
        if digit_at(after_sign) {
            is_float = true;
            end = scan_while(chars, after_sign, is_digit);
        }
    }
    let text: String = chars[start..end].iter().collect();
    let pos = start + 1;
    if !is_float {
        if let Ok(n) = text.parse::<i64>() {
            return Ok((TokenKind::Int(n), end));
        }
    }
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok((TokenKind::Float(x), end)),
        _ => Err(QueryError::at(
            format!("number {text} is out of range"),
            pos,
        )),
    }
}

/// A string in single or double quotes. Inside, the quote may be doubled (`'it''s'`) or
/// escaped with a backslash; `\\ \/ \b \f \n \r \t \uXXXX` are the other escapes.
fn lex_string(chars: &[char], start: usize) -> Result<(TokenKind, usize), QueryError> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err(QueryError::at("unterminated string", start + 1));
        };
        if c == quote {
            if chars.get(i + 1) == Some(&quote) {
                value.push(quote);
                i += 2;
                continue;
            }
            return Ok((TokenKind::Str(value), i + 1));
        }
        if c != '\\' {
            value.push(c);
            i += 1;
            continue;
        }
        let escape_pos = i + 1;
        let escaped = match chars.get(i + 1) {
            Some('\'') => '\'',
            Some('"') => '"',
            Some('\\') => '\\',
            Some('/') => '/',
            Some('b') => '\u{8}',
            Some('f') => '\u{c}',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('u') => {
                let hex: String = chars.iter().skip(i + 2).take(4).collect();
                let code = if hex.len() == 4 && hex.chars().all(|h| h.is_ascii_hexdigit()) {
                    u32::from_str_radix(&hex, 16).ok()
                } else {
                    None
                };
                match code.and_then(char::from_u32) {
                    Some(ch) => {
                        value.push(ch);
                        i += 6;
                        continue;
                    }
                    None => return Err(QueryError::at(
                        "invalid \\u escape in string (expected 4 hex digits of a valid character)",
                        escape_pos,
                    )),
                }
            }
            Some(other) => {
                return Err(QueryError::at(
                    format!("invalid escape '\\{}' in string", other.escape_default()),
                    escape_pos,
                ))
            }
            None => return Err(QueryError::at("unterminated string", start + 1)),
        };
        value.push(escaped);
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<TokenKind> {
        tokenize(text)
            .expect("valid tokens")
            .into_iter()
            .map(|t| t.kind)
            .collect()
    }

    #[test]
    fn punctuation_and_operators() {
        assert_eq!(
            kinds("= != <> < > <= >= + - * / % . , ( ) [ ]"),
            vec![
                TokenKind::Eq,
                TokenKind::NotEq,
                TokenKind::NotEq,
                TokenKind::Lt,
                TokenKind::Gt,
                TokenKind::Le,
                TokenKind::Ge,
                TokenKind::Plus,
                TokenKind::Minus,
                TokenKind::Star,
                TokenKind::Slash,
                TokenKind::Percent,
                TokenKind::Dot,
                TokenKind::Comma,
                TokenKind::LParen,
                TokenKind::RParen,
                TokenKind::LBracket,
                TokenKind::RBracket,
                TokenKind::End,
            ]
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(
            kinds("42 1.5 2e3 7E-1 99999999999999999999"),
            vec![
                TokenKind::Int(42),
                TokenKind::Float(1.5),
                TokenKind::Float(2000.0),
                TokenKind::Float(0.7),
                TokenKind::Float(1e20),
                TokenKind::End,
            ]
        );
        // A dot not followed by a digit is a path separator, not a fraction.
        assert_eq!(
            kinds("1.a"),
            vec![
                TokenKind::Int(1),
                TokenKind::Dot,
                TokenKind::Ident("a".into()),
                TokenKind::End
            ]
        );
        assert!(tokenize("1e999").is_err());
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(
            kinds(r#"'it''s' "say \"hi\"" 'a\'b' '\u0041\n'"#),
            vec![
                TokenKind::Str("it's".into()),
                TokenKind::Str("say \"hi\"".into()),
                TokenKind::Str("a'b".into()),
                TokenKind::Str("A\n".into()),
                TokenKind::End,
            ]
        );
    }

    #[test]
    fn identifiers_with_dollar() {
        assert_eq!(
            kinds("properties.desired.$version"),
            vec![
                TokenKind::Ident("properties".into()),
                TokenKind::Dot,
                TokenKind::Ident("desired".into()),
                TokenKind::Dot,
                TokenKind::Ident("$version".into()),
                TokenKind::End,
            ]
        );
    }

    #[test]
    fn errors_name_the_position() {
        let err = tokenize("a = 'open").expect_err("unterminated");
        assert_eq!(err.to_string(), "unterminated string at position 5");
        let err = tokenize("a ! b").expect_err("lone bang");
        assert_eq!(err.to_string(), "unexpected character '!' at position 3");
        let err = tokenize(r"'\q'").expect_err("bad escape");
        assert_eq!(err.position(), Some(2));
        assert!(tokenize(r"'\u12'").is_err());
        assert!(tokenize(r"'\ud800'").is_err());
    }
}
