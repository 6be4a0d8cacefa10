// Node azure-iothub (the service SDK) against the local hub: Client.send over AMQP, then the
// feedback receiver, as tests/interop/test_node_service.py drives it.
//
//   node send_c2d.js HUB_JSON DEVICE_ID MESSAGE_ID
//
// Prints one JSON line: {"sent": true, "feedback": [records]} or {"error": "..."}.
//
// Pointing the SDK at the local hub: its Amqp transport dials `amqps://` + the connection
// string's HostName, which for the local hub carries the REST port; the subclass below dials
// the hub's amqp_port instead (the host name, the token and the links stay the SDK's). The
// hub's CA comes from NODE_EXTRA_CA_CERTS, which Node's TLS honours.
'use strict';

const fs = require('fs');
const { Client, Amqp } = require('azure-iothub');
const { Message } = require('azure-iothub/dist/common-core/message');

const [hubJson, deviceId, messageId] = process.argv.slice(2);
const info = JSON.parse(fs.readFileSync(hubJson, 'utf8'));

class LocalHubAmqp extends Amqp {
  _getConnectionUri() {
    return 'amqps://localhost:' + info.amqp_port;
  }
}

function finish(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(result.error ? 1 : 0);
}

const timer = setTimeout(() => finish({ error: 'timed out' }), 20000);
const client = Client.fromConnectionString(info.service_connection_string, LocalHubAmqp);

client.open((openErr) => {
  if (openErr) return finish({ error: 'open: ' + openErr });
  client.getFeedbackReceiver((err, receiver) => {
    if (err) return finish({ error: 'getFeedbackReceiver: ' + err });
    // The session's hub may hold feedback of other tests' messages: read until ours comes.
    const seen = [];
    receiver.on('message', (msg) => {
      const records = JSON.parse(msg.getData().toString('utf8'));
      seen.push(...records);
      receiver.complete(msg, () => {
        if (records.some((r) => r.originalMessageId === messageId)) {
          clearTimeout(timer);
          client.close(() => finish({ sent: true, contentType: msg.contentType, feedback: seen }));
        }
      });
    });
    receiver.on('error', (e) => finish({ error: 'feedback receiver: ' + e }));
    const message = new Message('{"from":"node"}');
    message.messageId = messageId;
    message.correlationId = 'node-corr';
    message.ack = 'full';
    message.properties.add('sdk', 'node');
    client.send(deviceId, message, (sendErr) => {
      if (sendErr) finish({ error: 'send: ' + sendErr.constructor.name + ': ' + sendErr.message });
    });
  });
});
