//! What a receiver asks for, as text: its source address
//! (`[amqps://host[:port]/]{hub}/ConsumerGroups/{cg}/Partitions/{p}`, or IoT Hub's own
//! `messages/events/...`, which is redirected) and its selector filter
//! (`amqp.annotation.x-opt-offset > '123'`, as azure-eventhub's `event_position_selector`
//! writes it). Pure: no I/O, no hub state.

use crate::hub::events::StartAt;

/// The descriptor symbol of Event Hubs' selector filter.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// Its numeric descriptor (0x0000468C:0x00000004), which some clients send instead.
pub const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;

#[derive(Debug, PartialEq, Eq)]
pub struct PartitionAddress {
    pub hub: String,
    pub consumer_group: String,
    pub partition: String,
}

/// Strips `scheme://authority` from an address, leaving its path without the leading `/`.
pub fn path_of(address: &str) -> &str {
    match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, path)| path),
        None => address.trim_start_matches('/'),
    }
}

/// A partition receiver's address, or `None` when the address is not one.
pub fn parse_partition_address(address: &str) -> Option<PartitionAddress> {
    let parts: Vec<&str> = path_of(address).split('/').collect();
    match parts.as_slice() {
        [hub, groups, cg, partitions, p]
            if groups.eq_ignore_ascii_case("ConsumerGroups")
                && partitions.eq_ignore_ascii_case("Partitions")
                && !hub.is_empty()
                && !cg.is_empty()
                && !p.is_empty() =>
        {
            Some(PartitionAddress {
                hub: hub.to_string(),
                consumer_group: cg.to_string(),
                partition: p.to_string(),
            })
        }
        _ => None,
    }
}

/// IoT Hub's own name for its built-in endpoint: `[amqps://host/]messages/events[/REST]`,
/// which a real hub answers with `amqp:link:redirect` to the Event Hubs-compatible
/// endpoint. Returns REST (`ConsumerGroups/{cg}/Partitions/{p}`, `$management`, or empty).
pub fn iothub_events_rest(address: &str) -> Option<&str> {
    let path = path_of(address);
    let (head, rest) = match path.get(..15) {
        Some(head) => (head, &path[15..]),
        None => (path, ""),
    };
    if !head.eq_ignore_ascii_case("messages/events") {
        return None;
    }
    match rest {
        "" | "/" => Some(""),
        _ => rest.strip_prefix('/'),
    }
}

/// The address a redirect names: `{scheme}://{host}:{port}/{hub}[/REST]`, as IoT Hub names
/// its Event Hubs-compatible endpoint (the SDKs take the event hub's name from between the
/// port and the next `/`).
pub fn redirect_address(scheme: &str, host: &str, port: u16, hub: &str, rest: &str) -> String {
    if rest.is_empty() {
        format!("{scheme}://{host}:{port}/{hub}")
    } else {
        format!("{scheme}://{host}:{port}/{hub}/{rest}")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unsupported selector filter {0:?}")]
pub struct FilterError(pub String);

/// The start position of a selector expression: `amqp.annotation.x-opt-{offset |
/// sequence-number | enqueued-time} {> | >=} '{value}'`; offset `-1` is the beginning, `@latest`
/// the end.
pub fn parse_selector(expression: &str) -> Result<StartAt, FilterError> {
    let bad = || FilterError(expression.to_string());
    let mut words = expression.split_whitespace();
    let (Some(field), Some(operator), Some(value), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad());
    };
    let inclusive = match operator {
        ">" => false,
        ">=" => true,
        _ => return Err(bad()),
    };
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(bad)?;
    let field = field
        .strip_prefix("amqp.annotation.")
        .ok_or_else(bad)?
        .to_ascii_lowercase();
    match field.as_str() {
        "x-opt-offset" => match value {
            "-1" => Ok(StartAt::Beginning),
            "@latest" => Ok(StartAt::Latest),
            _ => Ok(StartAt::Offset {
                offset: value.parse().map_err(|_| bad())?,
                inclusive,
            }),
        },
        "x-opt-sequence-number" => Ok(StartAt::Sequence {
            sequence: value.parse().map_err(|_| bad())?,
            inclusive,
        }),
        "x-opt-enqueued-time" => Ok(StartAt::EnqueuedTime {
            ms: value.parse().map_err(|_| bad())?,
            inclusive,
        }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_addresses_with_and_without_a_host() {
        let expected = PartitionAddress {
            hub: "myhub".into(),
            consumer_group: "$Default".into(),
            partition: "2".into(),
        };
        for address in [
            "amqps://localhost:5671/myhub/ConsumerGroups/$Default/Partitions/2",
            "amqp://localhost/myhub/consumergroups/$Default/partitions/2",
            "myhub/ConsumerGroups/$Default/Partitions/2",
            "/myhub/ConsumerGroups/$Default/Partitions/2",
        ] {
            assert_eq!(
                parse_partition_address(address).as_ref(),
                Some(&expected),
                "{address}"
            );
        }
        assert_eq!(parse_partition_address("$cbs"), None);
        assert_eq!(
            parse_partition_address("myhub/ConsumerGroups/$Default"),
            None
        );
        assert_eq!(
            parse_partition_address("myhub/Partitions/x/ConsumerGroups/0"),
            None
        );
        assert_eq!(path_of("amqps://h/$management"), "$management");
    }

    #[test]
    fn iothub_addresses_are_recognised_for_the_redirect() {
        for (address, rest) in [
            (
                "amqps://myhub.azure-devices.net/messages/events/ConsumerGroups/$Default/Partitions/0",
                Some("ConsumerGroups/$Default/Partitions/0"),
            ),
            ("/messages/events/$management", Some("$management")),
            ("messages/events", Some("")),
            ("Messages/Events/", Some("")),
            ("messages/eventsX", None),
            ("messages/devicebound", None),
            ("myhub/ConsumerGroups/$Default/Partitions/0", None),
        ] {
            assert_eq!(iothub_events_rest(address), rest, "{address}");
        }
        assert_eq!(
            redirect_address("amqps", "localhost", 5671, "myhub", "$management"),
            "amqps://localhost:5671/myhub/$management"
        );
        let redirected = redirect_address(
            "amqps",
            "localhost",
            5671,
            "myhub",
            "ConsumerGroups/$Default/Partitions/0",
        );
        assert_eq!(
            parse_partition_address(&redirected).map(|a| a.hub),
            Some("myhub".to_string())
        );
    }

    #[test]
    fn selectors_as_azure_eventhub_writes_them() {
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-offset > '-1'"),
            Ok(StartAt::Beginning)
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-offset > '@latest'"),
            Ok(StartAt::Latest)
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-offset >= '4096'"),
            Ok(StartAt::Offset {
                offset: 4096,
                inclusive: true
            })
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-sequence-number > '7'"),
            Ok(StartAt::Sequence {
                sequence: 7,
                inclusive: false
            })
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-enqueued-time > '1700000000000'"),
            Ok(StartAt::EnqueuedTime {
                ms: 1_700_000_000_000,
                inclusive: false
            })
        );
        for bad in [
            "",
            "amqp.annotation.x-opt-offset = '1'",
            "amqp.annotation.x-opt-offset > 1",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-partition-key > '1'",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-offset > '1' OR 1=1",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }
}
