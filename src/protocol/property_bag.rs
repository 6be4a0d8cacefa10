//! Message property bags: the `k1=v1&k2=v2` tail of telemetry and cloud-to-device topics, also used
//! for the `?$rid=..&$version=..` query of twin and method topics.
//!
//! Keys and values are percent-decoded on parse and percent-encoded on format (so `%24.mid` and
//! `$.mid` are the same key). Order and duplicates are kept. A key with no value (`key`) is `None`,
//! an empty value (`key=`) is `Some("")`. Keys starting with `$.` are system properties.

use crate::protocol::encoding::{dec, enc, DecodeError};

/// Why a property bag could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertyBagError {
    #[error("property bag segment {0} has an empty key")]
    EmptyKey(usize),
    #[error("property bag segment {segment} is not valid percent-encoding: {source}")]
    BadEncoding {
        segment: usize,
        #[source]
        source: DecodeError,
    },
}

/// An ordered list of message properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PropertyBag {
    entries: Vec<(String, Option<String>)>,
}

const SYSTEM_PREFIX: &str = "$.";

impl PropertyBag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `k1=v1&k2&k3=`. Empty input is an empty bag; empty segments (`a=1&&b=2`, a trailing
    /// `&`) are skipped; an empty key (`=v`) is an error. `+` is not a space.
    pub fn parse(s: &str) -> Result<Self, PropertyBagError> {
        let mut entries = Vec::new();
        for (index, segment) in s.split('&').enumerate() {
            if segment.is_empty() {
                continue;
            }
            let decode = |text: &str| {
                dec(text).map_err(|source| PropertyBagError::BadEncoding {
                    segment: index + 1,
                    source,
                })
            };
            let (key, value) = match segment.split_once('=') {
                Some((k, v)) => (decode(k)?, Some(decode(v)?)),
                None => (decode(segment)?, None),
            };
            if key.is_empty() {
                return Err(PropertyBagError::EmptyKey(index + 1));
            }
            entries.push((key, value));
        }
        Ok(Self { entries })
    }

    /// Writes the bag percent-encoded (`$.mid` becomes `%24.mid`); empty bag gives "".
    pub fn format(&self) -> String {
        let mut out = String::new();
        for (i, (key, value)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(&enc(key));
            if let Some(v) = value {
                out.push('=');
                out.push_str(&enc(v));
            }
        }
        out
    }

    /// The value of the first entry named `key`; a key with no value gives `Some("")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_entry(key).map(|v| v.unwrap_or(""))
    }

    /// The first entry named `key`, keeping the difference between `key` (`Some(None)`) and
    /// `key=` (`Some(Some(""))`).
    pub fn get_entry(&self, key: &str) -> Option<Option<&str>> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    /// Sets `key=value`, replacing any entries with that key (in place of the first one).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.set(key.into(), Some(value.into()));
    }

    /// Sets `key` with no value, replacing any entries with that key.
    pub fn insert_without_value(&mut self, key: impl Into<String>) {
        self.set(key.into(), None);
    }

    fn set(&mut self, key: String, value: Option<String>) {
        match self.entries.iter().position(|(k, _)| *k == key) {
            Some(first) => {
                self.entries[first].1 = value;
                let mut index = 0;
                self.entries.retain(|(k, _)| {
                    let keep = index <= first || *k != key;
                    index += 1;
                    keep
                });
            }
            None => self.entries.push((key, value)),
        }
    }

    /// Removes every entry named `key`; returns whether there was one.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| k != key);
        self.entries.len() != before
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// System properties (`$.mid`, `$.ct`, ...) with the `$.` stripped.
    pub fn system_properties(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.iter()
            .filter_map(|(k, v)| k.strip_prefix(SYSTEM_PREFIX).map(|name| (name, v)))
    }

    /// Application properties: everything that is not a system property.
    pub fn application_properties(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.iter().filter(|(k, _)| !k.starts_with(SYSTEM_PREFIX))
    }

    /// Bytes that count against the message size limit: system property values plus application
    /// property names and values (decoded, UTF-8).
    pub fn size_for_limit(&self) -> usize {
        let system: usize = self
            .system_properties()
            .map(|(_, v)| v.map_or(0, str::len))
            .sum();
        let application: usize = self
            .application_properties()
            .map(|(k, v)| k.len() + v.map_or(0, str::len))
            .sum();
        system + application
    }
}

impl FromIterator<(String, Option<String>)> for PropertyBag {
    fn from_iter<I: IntoIterator<Item = (String, Option<String>)>>(iter: I) -> Self {
        Self {
            entries: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_python_sdk_example() {
        let bag =
            PropertyBag::parse("%24.mid=mid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=no")
                .unwrap();
        assert_eq!(bag.len(), 4);
        assert_eq!(bag.get("$.mid"), Some("mid-1"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert_eq!(bag.get("alert"), Some("no"));
        let system: Vec<_> = bag.system_properties().collect();
        assert_eq!(
            system,
            vec![
                ("mid", Some("mid-1")),
                ("ct", Some("application/json")),
                ("ce", Some("utf-8"))
            ]
        );
        let app: Vec<_> = bag.application_properties().collect();
        assert_eq!(app, vec![("alert", Some("no"))]);
        assert_eq!(
            bag.format(),
            "%24.mid=mid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=no"
        );
    }

    #[test]
    fn accepts_unencoded_dollar_and_keeps_plus() {
        let bag = PropertyBag::parse("$.mid=1&a=b+c").unwrap();
        assert_eq!(bag.get("$.mid"), Some("1"));
        assert_eq!(bag.get("a"), Some("b+c"));
    }

    #[test]
    fn key_without_value_and_empty_value_differ() {
        let bag = PropertyBag::parse("flag&empty=").unwrap();
        assert_eq!(bag.get_entry("flag"), Some(None));
        assert_eq!(bag.get_entry("empty"), Some(Some("")));
        assert_eq!(bag.get("flag"), Some(""));
        assert_eq!(bag.get("missing"), None);
        assert!(bag.contains_key("flag"));
        assert_eq!(bag.format(), "flag&empty=");
    }

    #[test]
    fn empty_input_and_empty_segments() {
        assert!(PropertyBag::parse("").unwrap().is_empty());
        let bag = PropertyBag::parse("a=1&&b=2&").unwrap();
        assert_eq!(bag.len(), 2);
    }

    #[test]
    fn errors() {
        assert_eq!(
            PropertyBag::parse("a=1&=2"),
            Err(PropertyBagError::EmptyKey(2))
        );
        assert!(matches!(
            PropertyBag::parse("a=%zz"),
            Err(PropertyBagError::BadEncoding { segment: 1, .. })
        ));
        assert!(matches!(
            PropertyBag::parse("%FF=1"),
            Err(PropertyBagError::BadEncoding {
                segment: 1,
                source: DecodeError::InvalidUtf8
            })
        ));
    }

    #[test]
    fn insert_replaces_and_remove_removes() {
        let mut bag = PropertyBag::parse("a=1&b=2&a=3").unwrap();
        bag.insert("a", "x");
        assert_eq!(bag.format(), "a=x&b=2");
        bag.insert_without_value("c");
        bag.insert("$.mid", "m");
        assert_eq!(bag.format(), "a=x&b=2&c&%24.mid=m");
        assert!(bag.remove("b"));
        assert!(!bag.remove("b"));
        assert_eq!(
            bag.iter().collect::<Vec<_>>(),
            vec![("a", Some("x")), ("c", None), ("$.mid", Some("m"))]
        );
    }

    #[test]
    fn size_counts_system_values_and_application_names_and_values() {
        let bag = PropertyBag::parse("%24.mid=12345&%24.ct=ab&temp=21&flag").unwrap();
        assert_eq!(bag.size_for_limit(), 5 + 2 + 4 + 2 + 4);
    }

    fn entries() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
        proptest::collection::vec((".+", proptest::option::of(".*")), 0..8)
    }

    proptest! {
        #[test]
        fn format_parse_round_trip(entries in entries()) {
            let bag: PropertyBag = entries.into_iter().collect();
            prop_assert_eq!(PropertyBag::parse(&bag.format()).unwrap(), bag);
        }
    }
}
