// Registers one device with the official Node.js provisioning client over MQTT (symmetric
// key) and prints the registration result as one JSON line; exits 1 with the error otherwise.
//
// Environment: DPS_HOST (host:port of the DPS device endpoint; the transport dials
// mqtts://DPS_HOST), ID_SCOPE, REGISTRATION_ID, DEVICE_KEY, and NODE_EXTRA_CA_CERTS for a
// local hub's CA (the transport has no CA option of its own).
'use strict';

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(name + ' is not set');
    process.exit(2);
  }
  return value;
}

const registrationId = required('REGISTRATION_ID');
const security = new SymmetricKeySecurityClient(registrationId, required('DEVICE_KEY'));
const client = ProvisioningDeviceClient.create(required('DPS_HOST'), required('ID_SCOPE'), new Mqtt(), security);
client.setProvisioningPayload({ client: 'node' });

client.register((err, result) => {
  if (err) {
    console.error('registration failed: ' + (err.message || err) + (err.result ? ' ' + JSON.stringify(err.result) : ''));
    process.exit(1);
  }
  console.log(JSON.stringify(result));
  process.exit(0);
});
