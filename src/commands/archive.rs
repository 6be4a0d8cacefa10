//! `simdevice archive to-csv`: a telemetry archive (the hub's capture files, or Azure's) into
//! one CSV file per device. The work is [`crate::archive`]'s; this verb turns the command line
//! into its options and prints the summary on stderr.

use std::path::PathBuf;

use crate::archive::{self, ArchiveError, GroupBy, Summary, ToCsv};

#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    #[command(subcommand)]
    pub command: ArchiveCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ArchiveCommand {
    /// Append every reading of an archive to OUT/<id>.csv, one file per device.
    #[command(after_help = "\
Every archive file under SOURCE (Event Hubs Capture's *.avro, or IoT Hub routing to storage's
names without an extension; codec null or deflate) is read in time order; empty files are
skipped. SOURCE is a directory, or a Blob Storage container: `azure://CONTAINER[/PREFIX]` with
the account's connection string in AZURE_STORAGE_CONNECTION_STRING (`UseDevelopmentStorage=true`
for Azurite), or `https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]?SAS` (a SAS with read
and list permissions, and delete for --delete). Each record's Body is parsed as a JSON
object and appended to OUT/<key>.csv, the key being its `id` field (or, with --by device, the
device id of its system properties). Characters of the key other than letters, digits, `_` and
`-` are written %XX in the file name (so `a/b` is `a%2Fb.csv`).

A new CSV file gets a header: id, timestamp, uv, temperature, humidity (those present), then the
other columns alphabetically. An existing file keeps its header; a value whose column it lacks
is dropped and reported.

A bad file (wrong magic, unknown schema, truncated) or record (Body null, not JSON, no id) is
reported with its file, record index and reason, and skipped; the run goes on. With --delete, a
file is removed once its rows are on disk; a file that could not be read to its end is kept.

Exit status: 0 when everything was converted; 1 when something was skipped or dropped (see the
warnings), or writing failed; 78 when SOURCE is missing, not a directory, or a container named
in a way that cannot be used (no connection string, no SAS, a bad container name).")]
    ToCsv(ToCsvArgs),
}

#[derive(Debug, clap::Args)]
pub struct ToCsvArgs {
    /// The archive: a directory; `azure://CONTAINER[/PREFIX]` (the account from
    /// AZURE_STORAGE_CONNECTION_STRING); or `https://ACCOUNT.blob.core.windows.net/CONTAINER?SAS`.
    pub source: String,
    /// Where the CSV files go (created when missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Delete each archive file once its rows are written and on disk.
    #[arg(long)]
    pub delete: bool,
    /// Group readings by their `id` field, or by the sending device's id.
    #[arg(long, value_enum, default_value_t = By::Id)]
    pub by: By,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Id,
    Device,
}

/// Runs the verb; the summary is on stderr, and `main` maps [`Summary::is_clean`] to 0 or 1.
pub async fn run(args: ArchiveArgs) -> Result<Summary, ArchiveError> {
    match args.command {
        ArchiveCommand::ToCsv(args) => {
            let options = ToCsv {
                source: args.source,
                out: args.out,
                delete: args.delete,
                by: match args.by {
                    By::Id => GroupBy::Id,
                    By::Device => GroupBy::Device,
                },
            };
            let summary = archive::to_csv(&options).await?;
            eprintln!("{}", summary_line(&summary, options.delete));
            Ok(summary)
        }
    }
}

fn summary_line(summary: &Summary, delete: bool) -> String {
    let mut line = format!(
        "archive: {} files read, {} rows written, {} records skipped",
        summary.files_read, summary.rows_written, summary.skipped_records
    );
    if summary.empty_files > 0 {
        line.push_str(&format!(", {} empty files", summary.empty_files));
    }
    if summary.bad_files > 0 {
        line.push_str(&format!(", {} unreadable files", summary.bad_files));
    }
    if summary.dropped_values > 0 {
        line.push_str(&format!(
            ", {} values dropped (no column)",
            summary.dropped_values
        ));
    }
    if delete {
        line.push_str(&format!(", {} files deleted", summary.files_deleted));
    }
    line
}
