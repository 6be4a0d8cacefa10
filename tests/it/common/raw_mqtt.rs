//! Raw MQTT bytes, for what rumqttc's codec would refuse to write: any field contents, any
//! remaining length, reserved packet types. Used by the hostile-input tests and the fake hub.

use bytes::BytesMut;
use rumqttc::Packet;

/// MQTT's variable-length encoding of a remaining length (no upper limit: the test decides).
pub fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return out;
        }
    }
}

/// One MQTT packet: the first byte, the remaining length, the body.
pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed MQTT string or binary field.
pub fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// A CONNECT with user name and password, persistent session, keep-alive 60 s.
pub fn raw_connect(client_id: &[u8], username: &[u8], password: &[u8]) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.push(4);
    body.push(0b1100_0000); // user name and password, persistent session
    body.extend(60u16.to_be_bytes());
    body.extend(field(client_id));
    body.extend(field(username));
    body.extend(field(password));
    frame(0x10, &body)
}

/// A QoS 1 PUBLISH.
pub fn raw_publish_qos1(topic: &[u8], pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = field(topic);
    body.extend(pkid.to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x32, &body)
}

/// A SUBSCRIBE of one filter at QoS 1, packet id 7.
pub fn raw_subscribe(filter: &[u8]) -> Vec<u8> {
    let mut body = 7u16.to_be_bytes().to_vec();
    body.extend(field(filter));
    body.push(1);
    frame(0x82, &body)
}

/// A packet as rumqttc writes it (with a limit far above the hub's).
pub fn encode(packet: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, 1 << 24).expect("encodable");
    out.to_vec()
}
