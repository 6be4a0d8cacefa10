//! Device ids as IoT Hub accepts them, checked the same way by the agent's configuration and by
//! the hub's registry, so a device the local hub creates can always be configured and dialled.
//!
//! The rule: 1 to 128 ASCII letters, digits and `- . % _ * ? ! ( ) , : = @ $ '`, case-sensitive
//! (Microsoft's device identity registry documentation). Some of Microsoft's pages also list
//! `+`, `#` and `;`; they are refused here on purpose: `+` and `#` are MQTT wildcards, which
//! cannot stand in the topic names built from the id (`devices/{id}/messages/events/`), and `;`
//! separates the fields of a connection string (`DeviceId=...;SharedAccessKey=...`).
//!
//! Pure: no I/O.

/// The longest device id, in characters (all ASCII, so also in bytes).
pub const MAX_DEVICE_ID_CHARS: usize = 128;

/// The characters a device id may hold besides ASCII letters and digits.
pub const DEVICE_ID_SPECIAL_CHARS: &str = "-.%_*?!(),:=@$'";

/// Why a device id is refused. The messages read after the name of what holds the id
/// ("identity.device_id is empty", "device id is empty").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("is empty")]
    Empty,
    #[error("is {0} characters, over the {MAX_DEVICE_ID_CHARS}-character limit")]
    TooLong(usize),
    #[error(
        "{id:?} contains {ch:?}; device ids allow ASCII letters, digits and {DEVICE_ID_SPECIAL_CHARS}"
    )]
    InvalidChar { id: String, ch: char },
}

/// Checks `id` against IoT Hub's device id rule.
pub fn validate_device_id(id: &str) -> Result<(), DeviceIdError> {
    if id.is_empty() {
        return Err(DeviceIdError::Empty);
    }
    let chars = id.chars().count();
    if chars > MAX_DEVICE_ID_CHARS {
        return Err(DeviceIdError::TooLong(chars));
    }
    if let Some(ch) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || DEVICE_ID_SPECIAL_CHARS.contains(*c)))
    {
        return Err(DeviceIdError::InvalidChar {
            id: id.to_string(),
            ch,
        });
    }
    Ok(())
}

/// Device ids `prefix` + number for `first ..= first + count - 1`, each number zero-padded to
/// the width of the last (`door-`, 1, 10,000: `door-00001` ... `door-10000`), so that ids sort
/// as their numbers do. `None` when the range does not fit in a `u64`.
pub fn numbered_ids(
    prefix: &str,
    first: u64,
    count: u64,
) -> Option<impl Iterator<Item = String> + '_> {
    let last = first.checked_add(count.checked_sub(1)?)?;
    let width = last.to_string().len();
    Some((first..=last).map(move |n| format!("{prefix}{n:0width$}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_ids_are_padded_to_the_width_of_the_last() {
        let ids: Vec<String> = numbered_ids("door-", 1, 10_000).unwrap().collect();
        assert_eq!(ids.len(), 10_000);
        assert_eq!(ids[0], "door-00001");
        assert_eq!(ids[9_999], "door-10000");
        let ids: Vec<String> = numbered_ids("d", 8, 3).unwrap().collect();
        assert_eq!(ids, ["d08", "d09", "d10"]);
        assert!(numbered_ids("d", 1, 0).is_none(), "no ids");
        assert!(numbered_ids("d", u64::MAX, 2).is_none(), "past u64");
    }

    #[test]
    fn every_documented_character_is_accepted() {
        assert_eq!(
            validate_device_id("door-01.a_b*c?d!(e),f:g=h@i$j'k%"),
            Ok(())
        );
        assert_eq!(validate_device_id("AZaz09"), Ok(()));
    }

    #[test]
    fn the_limit_is_128_characters() {
        assert_eq!(validate_device_id(&"a".repeat(128)), Ok(()));
        assert_eq!(
            validate_device_id(&"a".repeat(129)),
            Err(DeviceIdError::TooLong(129))
        );
        assert_eq!(validate_device_id(""), Err(DeviceIdError::Empty));
    }

    #[test]
    fn other_characters_are_refused() {
        for (id, ch) in [
            ("door/01", '/'),
            ("a b", ' '),
            ("tür", 'ü'),
            ("a+b", '+'),
            ("a#b", '#'),
            ("a;b", ';'),
            ("a\0b", '\0'),
        ] {
            assert_eq!(
                validate_device_id(id),
                Err(DeviceIdError::InvalidChar {
                    id: id.to_string(),
                    ch
                }),
                "{id:?}"
            );
        }
    }

    #[test]
    fn the_message_names_the_character_and_the_rule() {
        let error = validate_device_id("door/01").unwrap_err();
        assert_eq!(
            error.to_string(),
            "\"door/01\" contains '/'; device ids allow ASCII letters, digits and -.%_*?!(),:=@$'"
        );
    }
}
