//! The `SpiffeWorkloadAPI` service: the five methods of the X.509-SVID and JWT-SVID profiles
//! (SPIFFE Workload API standard), answering each caller from what attestation says it is.
//!
//! Every request must carry the security header `workload.spiffe.io: true`
//! (`InvalidArgument` otherwise). Every method answers only a caller that holds an identity
//! now (`PermissionDenied` otherwise, also for the bundle methods: a process the node does not
//! vouch for learns nothing from it). Streams send their first message at once, then a new one
//! whenever what the caller would get changes (an SVID rotated, a reload that changes its
//! identity, an exec); a caller that loses its identity gets `PermissionDenied` and its stream
//! ends. A stopping daemon ends every stream with `Unavailable`.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    Caller, SECURITY_HEADER,
    changes::Changes,
    claims,
    limits::{Limits, StreamSlot},
    metrics::{ApiMetrics, Method},
    proto::{
        JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
        ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
        X509svid, X509svidRequest, X509svidResponse, spiffe_workload_api_server::SpiffeWorkloadApi,
    },
};
use crate::identity::{
    JwtBundleSet, JwtError, JwtSvid, SpiffeId, TrustBundleSet, ValidatedJwt, X509Svid,
};

/// Why a caller gets nothing.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    /// The caller's process is not in an enrolled cgroup: the node enforces nothing it does,
    /// so it vouches for nothing it is.
    #[error("pid {pid} ({exe}) is not in an enrolled cgroup")]
    NotEnrolled {
        /// The caller.
        pid: u32,
        /// Its binary.
        exe: String,
    },
    /// No workload entry selects the caller (or two do, or a `unix:sha256` entry refuses it).
    #[error("no workload entry gives pid {pid} ({exe}) an identity: {why}")]
    NoIdentity {
        /// The caller.
        pid: u32,
        /// Its binary.
        exe: String,
        /// Unmatched, ambiguous, or why the entry refused it.
        why: String,
    },
    /// The process that opened the connection has execed (or moved) since: the connection
    /// served that image, and serves no later one.
    #[error(
        "pid {pid} is no longer the image that opened this connection (it execed or moved): connect again"
    )]
    Execed {
        /// The caller.
        pid: u32,
    },
    /// The caller could not be attested (it exited, or its facts could not be read).
    #[error("pid {pid} could not be attested: {why}")]
    Unattested {
        /// The caller.
        pid: u32,
        /// What failed.
        why: String,
    },
}

/// Who a caller is: the daemon attests it exactly like a redirected client (same workload
/// entries, same selectors, same cache); tests answer from tables.
pub trait CallerIdentity: Send + Sync + 'static {
    /// The identity `caller` holds now. Blocking (procfs reads, hashing). A refusal is the
    /// implementation's to record.
    fn identify(&self, caller: &Caller) -> Result<SpiffeId, Denial>;
}

/// What the node hands out and checks.
pub trait Credentials: Send + Sync + 'static {
    /// The current X.509-SVID of `id` (issued or rotated when due). Blocking.
    fn x509_svid(&self, id: &SpiffeId) -> Result<Arc<X509Svid>, String>;
    /// The X.509 bundles: this trust domain's and the federated ones.
    fn x509_bundles(&self) -> Arc<TrustBundleSet>;
    /// A JWT-SVID of `id` for `audience`.
    fn jwt_svid(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, JwtError>;
    /// The JWT bundles.
    fn jwt_bundles(&self) -> Arc<JwtBundleSet>;
    /// Validates a JWT-SVID for `audience` against the JWT bundles, now.
    fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwt, JwtError>;
}

/// The Workload API service, as the gRPC server calls it. Cheap to clone.
#[derive(Clone)]
pub struct WorkloadApi {
    inner: Arc<Inner>,
}

struct Inner {
    callers: Arc<dyn CallerIdentity>,
    credentials: Arc<dyn Credentials>,
    changes: Changes,
    limits: Arc<Limits>,
    metrics: Arc<ApiMetrics>,
    /// How often a stream looks again with no change reported (events can be lost).
    recheck: Duration,
    stop: watch::Receiver<bool>,
    /// Attestations and derivations running at once, off the async workers: however many
    /// requests callers send, the blocking pool's other users (rescans, rotation) get threads.
    blocking: Semaphore,
}

/// Blocking derivations (attestation, issuance, signing) running at once.
const BLOCKING_AT_ONCE: usize = 16;

impl WorkloadApi {
    /// A service answering from `callers` and `credentials`, its streams following `changes`
    /// (and looking again every `recheck`), within `limits`, counted in `metrics`, until
    /// `stop` turns true.
    #[must_use]
    pub fn new(
        (callers, credentials): (Arc<dyn CallerIdentity>, Arc<dyn Credentials>),
        changes: Changes,
        (limits, metrics): (Arc<Limits>, Arc<ApiMetrics>),
        recheck: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                callers,
                credentials,
                changes,
                limits,
                metrics,
                recheck,
                stop,
                blocking: Semaphore::new(BLOCKING_AT_ONCE),
            }),
        }
    }

    /// Whether a new connection of `caller` is served: its caller must hold an identity now
    /// (which also fixes the process image the connection serves, see [`Caller::is_image`]).
    pub(crate) async fn admit_connection(&self, caller: &Arc<Caller>) -> Result<(), Status> {
        let caller = Arc::clone(caller);
        self.blocking(move |inner| inner.identify(&caller).map(drop))
            .await
    }

    /// The limits the service counts streams in (the server counts connections in them).
    pub(crate) fn limits(&self) -> &Arc<Limits> {
        &self.inner.limits
    }

    /// The counters.
    pub(crate) fn metrics(&self) -> &Arc<ApiMetrics> {
        &self.inner.metrics
    }

    /// The caller of `request`, once its security header is checked; the outcome of a refusal
    /// is counted for `method`.
    fn admit<T>(&self, request: &Request<T>, method: Method) -> Result<Arc<Caller>, Status> {
        let header = request.metadata().get(SECURITY_HEADER);
        if header.is_none_or(|value| value != "true") {
            return Err(self.refuse(
                method,
                Status::invalid_argument(format!(
                    "security header missing from request: every Workload API request must carry `{SECURITY_HEADER}: true`"
                )),
            ));
        }
        request
            .extensions()
            .get::<Arc<Caller>>()
            .cloned()
            .ok_or_else(|| {
                self.refuse(
                    method,
                    Status::internal("the connection's caller was not pinned"),
                )
            })
    }

    /// Counts `status` as `method`'s answer and returns it.
    fn refuse(&self, method: Method, status: Status) -> Status {
        self.inner.metrics.request(method, status.code());
        status
    }

    /// Runs `work` off the async workers with this service's state.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let Ok(_permit) = self.inner.blocking.acquire().await else {
            return Err(Status::unavailable("the daemon is stopping"));
        };
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .unwrap_or_else(|error| Err(Status::internal(format!("worker failed: {error}"))))
    }

    /// Opens a stream of `caller` for `method`: its first message, derived now, then one more
    /// whenever `derive` gives another; counted in the limits while open.
    async fn stream<M>(
        &self,
        caller: Arc<Caller>,
        method: Method,
        derive: fn(&Inner, &Caller) -> Result<M, Status>,
    ) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status>
    where
        M: prost::Message + Send + Sync + 'static,
    {
        let slot = self.inner.limits.stream(caller.pid()).ok_or_else(|| {
            self.refuse(
                method,
                Status::resource_exhausted(format!(
                    "too many open streams: pid {} may hold {}",
                    caller.pid(),
                    self.inner.limits.per_caller()
                )),
            )
        })?;
        let watch = self.inner.changes.watch(caller.pid());
        let pinned = Arc::clone(&caller);
        let first = self
            .blocking(move |inner| derive(inner, &pinned))
            .await
            .map_err(|status| self.refuse(method, status))?;
        self.inner.metrics.request(method, tonic::Code::Ok);
        let (sender, receiver) = mpsc::channel(2);
        if method == Method::FetchX509Svid {
            self.inner.metrics.x509_pushed();
        }
        let sent = digest(&first);
        // The channel holds two messages and is empty: this cannot fail.
        let _ = sender.try_send(Ok(first));
        tokio::spawn(self.clone().follow(
            Following {
                caller,
                method,
                watch,
                sender,
                _slot: slot,
            },
            sent,
            derive,
        ));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    /// Keeps an open stream up to date until its client goes, its caller loses its identity,
    /// or the daemon stops. It remembers the digest of the last message it sent (`sent`), not
    /// the message: a thousand streams hold no copies of keys and chains.
    async fn follow<M>(
        self,
        mut stream: Following<M>,
        mut sent: [u8; 32],
        derive: fn(&Inner, &Caller) -> Result<M, Status>,
    ) where
        M: prost::Message + Send + Sync + 'static,
    {
        {
            let mut stop = self.inner.stop.clone();
            loop {
                tokio::select! {
                    () = stream.sender.closed() => return,
                    () = super::stopping(&mut stop) => {
                        // A client that reads nothing must not hold the stream open.
                        let _ = stream.sender.try_send(Err(Status::unavailable("the daemon is stopping")));
                        return;
                    }
                    () = stream.watch.changed() => {}
                    () = tokio::time::sleep(self.inner.recheck) => {}
                }
                let caller = Arc::clone(&stream.caller);
                match self.blocking(move |inner| derive(inner, &caller)).await {
                    Ok(next) if digest(&next) == sent => {}
                    Ok(next) => {
                        sent = digest(&next);
                        if stream.sender.send(Ok(next)).await.is_err() {
                            return;
                        }
                        if stream.method == Method::FetchX509Svid {
                            self.inner.metrics.x509_pushed();
                        }
                    }
                    Err(status) => {
                        let _ = stream.sender.send(Err(status)).await;
                        return;
                    }
                }
            }
        }
    }
}

/// An open stream.
struct Following<M> {
    caller: Arc<Caller>,
    method: Method,
    watch: super::changes::Watch,
    sender: mpsc::Sender<Result<M, Status>>,
    _slot: StreamSlot,
}

impl Inner {
    /// The identity of `caller`, or `PermissionDenied`.
    fn identify(&self, caller: &Caller) -> Result<SpiffeId, Status> {
        self.callers
            .identify(caller)
            .map_err(|denial| Status::permission_denied(denial.to_string()))
    }

    /// `caller`'s X.509-SVID with its key and bundles.
    fn x509_svid(&self, caller: &Caller) -> Result<X509svidResponse, Status> {
        let id = self.identify(caller)?;
        let svid = self
            .credentials
            .x509_svid(&id)
            .map_err(|error| Status::unavailable(format!("no X.509-SVID for {id}: {error}")))?;
        let bundles = self.credentials.x509_bundles();
        let own = bundles
            .get_by_name(id.trust_domain_str())
            .map(|bundle| concat(bundle.authorities()))
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "no bundle for trust domain {}",
                    id.trust_domain_str()
                ))
            })?;
        Ok(X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: id.to_string(),
                x509_svid: concat(svid.chain()),
                x509_svid_key: svid.private_key().secret_der().to_vec(),
                bundle: own,
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: x509_bundles(&bundles, Some(id.trust_domain_str())),
        })
    }

    /// Every X.509 bundle, for a caller that holds an identity.
    fn x509_bundles(&self, caller: &Caller) -> Result<X509BundlesResponse, Status> {
        self.identify(caller)?;
        Ok(X509BundlesResponse {
            crl: Vec::new(),
            bundles: x509_bundles(&self.credentials.x509_bundles(), None),
        })
    }

    /// Every JWT bundle (JWKS), for a caller that holds an identity.
    fn jwt_bundles(&self, caller: &Caller) -> Result<JwtBundlesResponse, Status> {
        self.identify(caller)?;
        Ok(JwtBundlesResponse {
            bundles: self
                .credentials
                .jwt_bundles()
                .iter()
                .map(|bundle| {
                    (
                        format!("spiffe://{}", bundle.trust_domain()),
                        bundle.to_jwks(),
                    )
                })
                .collect(),
        })
    }

    /// A JWT-SVID of `caller` for `request`'s audience.
    fn jwt_svid(
        &self,
        caller: &Caller,
        request: &JwtsvidRequest,
    ) -> Result<JwtsvidResponse, Status> {
        if request.audience.is_empty() || request.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "audience is required: at least one, none empty",
            ));
        }
        let wanted = match request.spiffe_id.as_str() {
            "" => None,
            text => Some(text.parse::<SpiffeId>().map_err(|error| {
                Status::invalid_argument(format!("spiffe_id {text:?}: {error}"))
            })?),
        };
        let id = self.identify(caller)?;
        if let Some(wanted) = wanted
            && wanted != id
        {
            return Err(Status::permission_denied(format!(
                "pid {} holds {id}, not {wanted}",
                caller.pid()
            )));
        }
        let svid = self
            .credentials
            .jwt_svid(&id, &request.audience)
            .map_err(|error| Status::internal(format!("failed to mint a JWT-SVID: {error}")))?;
        Ok(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: id.to_string(),
                svid: svid.token,
                hint: String::new(),
            }],
        })
    }

    /// Validates `request`'s token for its audience, for a caller that holds an identity.
    fn validate_jwt(
        &self,
        caller: &Caller,
        request: &ValidateJwtsvidRequest,
    ) -> Result<ValidateJwtsvidResponse, Status> {
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if request.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        self.identify(caller)?;
        let validated = self
            .credentials
            .validate_jwt(&request.svid, &request.audience)
            .map_err(|error| Status::invalid_argument(format!("invalid JWT-SVID: {error}")))?;
        Ok(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(claims::to_struct(validated.claims)),
        })
    }
}

/// The SHA-256 of `message`'s encoding: what a stream compares its next message with.
fn digest(message: &impl prost::Message) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(message.encode_to_vec()).into()
}

/// DER certificates, concatenated (the Workload API's encoding of chains and bundles).
fn concat(certificates: &[rustls_pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certificates
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// The bundles keyed by their trust domain's SPIFFE ID, without `except`.
fn x509_bundles(bundles: &TrustBundleSet, except: Option<&str>) -> BTreeMap<String, Vec<u8>> {
    bundles
        .iter()
        .filter(|bundle| Some(bundle.trust_domain().as_str()) != except)
        .map(|bundle| {
            (
                format!("spiffe://{}", bundle.trust_domain()),
                concat(bundle.authorities()),
            )
        })
        .collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.admit(&request, Method::FetchX509Svid)?;
        self.stream(caller, Method::FetchX509Svid, Inner::x509_svid)
            .await
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.admit(&request, Method::FetchX509Bundles)?;
        self.stream(caller, Method::FetchX509Bundles, Inner::x509_bundles)
            .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let method = Method::FetchJwtSvid;
        let caller = self.admit(&request, method)?;
        let request = request.into_inner();
        let answer = self
            .blocking(move |inner| inner.jwt_svid(&caller, &request))
            .await;
        self.answered(method, answer)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self.admit(&request, Method::FetchJwtBundles)?;
        self.stream(caller, Method::FetchJwtBundles, Inner::jwt_bundles)
            .await
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let method = Method::ValidateJwtSvid;
        let caller = self.admit(&request, method)?;
        let request = request.into_inner();
        let answer = self
            .blocking(move |inner| inner.validate_jwt(&caller, &request))
            .await;
        self.answered(method, answer)
    }
}

impl WorkloadApi {
    /// A unary answer, counted.
    fn answered<T>(
        &self,
        method: Method,
        answer: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        match answer {
            Ok(message) => {
                self.inner.metrics.request(method, tonic::Code::Ok);
                Ok(Response::new(message))
            }
            Err(status) => Err(self.refuse(method, status)),
        }
    }
}
