//! `enforcer api`: a SPIFFE Workload API client, like `spire-agent api`. The caller the daemon
//! attests is this process: run it as (or in place of) the workload whose identity it fetches.
//!
//! The endpoint is `--socket` when given on the command line, else `SPIFFE_ENDPOINT_SOCKET`,
//! else `/run/enforcer/public/api.sock`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::SystemTime,
};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

use crate::{
    identity::{encode_certificates, encode_private_key, write_private, write_public},
    workload_api::{
        self, Client, ENDPOINT_ENV,
        proto::{
            JwtsvidRequest, ValidateJwtsvidRequest, X509svid, X509svidRequest, X509svidResponse,
        },
    },
};

/// Workload API calls.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch this process's SVIDs.
    Fetch {
        /// Which kind.
        #[command(subcommand)]
        kind: FetchKind,
    },
    /// Validate a JWT-SVID.
    Validate {
        /// Which kind.
        #[command(subcommand)]
        kind: ValidateKind,
    },
    /// Print every X.509-SVID update as the daemon pushes it, until the stream ends.
    Watch {
        /// Print one JSON object per update.
        #[arg(long)]
        json: bool,
    },
}

/// What `fetch` fetches.
#[derive(Debug, Subcommand)]
pub enum FetchKind {
    /// The X.509-SVID, its key and the bundles.
    X509 {
        /// Write `svid.0.pem` (chain, leaf first), `svid.0.key` (PKCS#8, 0600) and
        /// `bundle.0.pem` (the trust domain's roots) into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A JWT-SVID for one or more audiences.
    Jwt {
        /// The audience (repeat for several).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID's (it must be this process's).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `validate` validates.
#[derive(Debug, Subcommand)]
pub enum ValidateKind {
    /// A JWT-SVID, for an audience.
    Jwt {
        /// The audience the token must name.
        #[arg(long)]
        audience: String,
        /// The token (JWS compact serialization).
        token: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl ApiCommand {
    /// Runs the call against the Workload API at `socket` (when given on the command line).
    pub fn run(self, socket: Option<&Path>) -> anyhow::Result<ExitCode> {
        let socket = endpoint(socket)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")?;
        runtime.block_on(async move {
            let mut client = workload_api::connect(&socket).await?;
            match self {
                Self::Fetch {
                    kind: FetchKind::X509 { write, json },
                } => fetch_x509(&mut client, write.as_deref(), json).await,
                Self::Fetch {
                    kind:
                        FetchKind::Jwt {
                            audience,
                            spiffe_id,
                            json,
                        },
                } => fetch_jwt(&mut client, audience, spiffe_id, json).await,
                Self::Validate {
                    kind:
                        ValidateKind::Jwt {
                            audience,
                            token,
                            json,
                        },
                } => validate_jwt(&mut client, audience, token, json).await,
                Self::Watch { json } => watch(&mut client, json).await,
            }
        })
    }
}

/// The endpoint: `--socket`, else `SPIFFE_ENDPOINT_SOCKET`, else the default.
fn endpoint(socket: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(socket) = socket {
        return workload_api::socket_path(&socket.to_string_lossy()).context("--socket");
    }
    match std::env::var(ENDPOINT_ENV) {
        Ok(value) => workload_api::socket_path(&value).context(ENDPOINT_ENV),
        Err(_) => Ok(PathBuf::from(workload_api::DEFAULT_SOCKET)),
    }
}

/// A refusal as the error the CLI prints: the gRPC code and the daemon's message.
#[expect(clippy::needless_pass_by_value, reason = "a `map_err` function")]
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

async fn fetch_x509(
    client: &mut Client,
    write: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let response = stream
        .message()
        .await
        .map_err(refused)?
        .context("the stream ended before its first message")?;
    let svid = only_svid(&response)?;
    let summary = Summary::of(svid, &response)?;
    if let Some(dir) = write {
        write_files(dir, svid)?;
    }
    if json {
        println!("{}", summary.json());
    } else {
        print!("{summary}");
        if let Some(dir) = write {
            println!(
                "written: {}/svid.0.pem, svid.0.key, bundle.0.pem",
                dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn fetch_jwt(
    client: &mut Client,
    audience: Vec<String>,
    spiffe_id: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let response = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience,
            spiffe_id: spiffe_id.unwrap_or_default(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    for svid in &response.svids {
        if json {
            println!(
                "{}",
                json!({"spiffe_id": svid.spiffe_id, "token": svid.svid})
            );
        } else {
            println!("token({}):\n\t{}", svid.spiffe_id, svid.svid);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn validate_jwt(
    client: &mut Client,
    audience: String,
    token: String,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let response = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience,
            svid: token,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let claims = response.claims.map(claims_json).unwrap_or_default();
    if json {
        println!(
            "{}",
            json!({"spiffe_id": response.spiffe_id, "claims": claims})
        );
    } else {
        println!("valid: {}\nclaims: {claims}", response.spiffe_id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch(client: &mut Client, json: bool) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                let summary = Summary::of(only_svid(&response)?, &response)?;
                if json {
                    println!("{}", summary.json());
                } else {
                    println!(
                        "{} {} serial {} until {}",
                        humantime::format_rfc3339_seconds(SystemTime::now()),
                        summary.spiffe_id,
                        summary.serial,
                        humantime::format_rfc3339_seconds(summary.not_after)
                    );
                }
            }
            Ok(None) => bail!("the daemon ended the stream"),
            Err(status) => return Err(refused(status)),
        }
    }
}

/// The one SVID of a response (the daemon gives each caller one identity).
fn only_svid(response: &X509svidResponse) -> anyhow::Result<&X509svid> {
    match response.svids.as_slice() {
        [svid] => Ok(svid),
        svids => bail!("expected one SVID, got {}", svids.len()),
    }
}

/// What the CLI shows of an X.509-SVID response.
struct Summary {
    spiffe_id: String,
    serial: String,
    not_after: SystemTime,
    chain: usize,
    authorities: usize,
    federated: Vec<String>,
}

impl Summary {
    fn of(svid: &X509svid, response: &X509svidResponse) -> anyhow::Result<Self> {
        let chain = split_der(&svid.x509_svid).context("the SVID chain")?;
        let authorities = split_der(&svid.bundle).context("the bundle")?.len();
        let leaf = chain.first().context("an empty SVID chain")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|error| anyhow::anyhow!("the SVID leaf: {error}"))?;
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or_default(),
            );
        let mut federated: Vec<String> = response.federated_bundles.keys().cloned().collect();
        federated.sort();
        Ok(Self {
            spiffe_id: svid.spiffe_id.clone(),
            serial: parsed.raw_serial_as_string().replace(':', ""),
            not_after,
            chain: chain.len(),
            authorities,
            federated,
        })
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "not_after": humantime::format_rfc3339_seconds(self.not_after).to_string(),
            "chain": self.chain,
            "bundle_authorities": self.authorities,
            "federated": self.federated,
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "spiffe id: {}", self.spiffe_id)?;
        writeln!(f, "serial: {}", self.serial)?;
        writeln!(
            f,
            "valid until: {}",
            humantime::format_rfc3339_seconds(self.not_after)
        )?;
        writeln!(
            f,
            "chain: {} certificates; bundle: {} authorities; federated: {}",
            self.chain,
            self.authorities,
            if self.federated.is_empty() {
                "none".to_owned()
            } else {
                self.federated.join(", ")
            }
        )
    }
}

/// Concatenated DER certificates, one by one.
fn split_der(mut der: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut certificates = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| anyhow::anyhow!("certificate {}: {error}", certificates.len() + 1))?;
        let length = der.len() - rest.len();
        certificates.push(CertificateDer::from(der[..length].to_vec()));
        der = rest;
    }
    Ok(certificates)
}

/// `svid.0.pem`, `svid.0.key` (0600) and `bundle.0.pem` in `dir`.
fn write_files(dir: &Path, svid: &X509svid) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let chain = split_der(&svid.x509_svid)?;
    let bundle = split_der(&svid.bundle)?;
    let key = PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone());
    write_public(&dir.join("svid.0.pem"), &encode_certificates(&chain))?;
    write_private(&dir.join("svid.0.key"), &encode_private_key(&key))?;
    write_public(&dir.join("bundle.0.pem"), &encode_certificates(&bundle))?;
    Ok(())
}

/// A protobuf `Struct` of claims as JSON.
fn claims_json(claims: prost_types::Struct) -> serde_json::Value {
    claims
        .fields
        .into_iter()
        .map(|(name, field)| (name, value_json(field)))
        .collect()
}

/// A protobuf `Value` as JSON.
fn value_json(value: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(flag)) => json!(flag),
        Some(Kind::NumberValue(number)) => json!(number),
        Some(Kind::StringValue(text)) => json!(text),
        Some(Kind::ListValue(list)) => list.values.into_iter().map(value_json).collect(),
        Some(Kind::StructValue(fields)) => claims_json(fields),
    }
}
