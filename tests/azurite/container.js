// Makes a Blob Storage container with the official SDK (@azure/storage-blob) and prints a SAS
// URL for it, for the tests: `node container.js BLOB_ENDPOINT CONTAINER`, where BLOB_ENDPOINT is
// the account's endpoint (Azurite: http(s)://127.0.0.1:PORT/devstoreaccount1). With `--list`
// after CONTAINER, it prints the container's blob names instead, one a line. The account key
// comes from AZURE_STORAGE_KEY (Azurite's well-known key by default). The SAS allows read, add,
// create, write, delete and list for one hour. For an HTTPS endpoint signed by a test CA, run
// with NODE_EXTRA_CA_CERTS=ca.pem.
const {
  BlobServiceClient,
  StorageSharedKeyCredential,
  ContainerSASPermissions,
  generateBlobSASQueryParameters,
} = require("@azure/storage-blob");

const AZURITE_KEY =
  "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

async function main() {
  const [endpoint, container, mode] = process.argv.slice(2);
  if (!endpoint || !container) {
    throw new Error("usage: node container.js BLOB_ENDPOINT CONTAINER");
  }
  const account = new URL(endpoint).pathname.split("/").filter(Boolean)[0] || "devstoreaccount1";
  const credential = new StorageSharedKeyCredential(
    account,
    process.env.AZURE_STORAGE_KEY || AZURITE_KEY,
  );
  const service = new BlobServiceClient(endpoint, credential);
  const client = service.getContainerClient(container);
  if (mode === "--list") {
    for await (const blob of client.listBlobsFlat()) {
      process.stdout.write(`${blob.name}\n`);
    }
    return;
  }
  await client.createIfNotExists();
  const sas = generateBlobSASQueryParameters(
    {
      containerName: container,
      permissions: ContainerSASPermissions.parse("racwdl"),
      startsOn: new Date(Date.now() - 60 * 1000),
      expiresOn: new Date(Date.now() + 60 * 60 * 1000),
    },
    credential,
  ).toString();
  process.stdout.write(`${client.url}?${sas}\n`);
}

main().catch((error) => {
  process.stderr.write(`container.js: ${error.message}\n`);
  process.exit(1);
});
