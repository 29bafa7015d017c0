//! The control API: HTTP/1.1 with JSON bodies over a Unix socket (the Firecracker convention),
//! described by the OpenAPI document `openapi.json` beside this file and served at
//! `GET /openapi.json`.
//!
//! Requests flow one way: [`server`] reads them, [`routes`] turns each into calls on the
//! [`Vm`](crate::Vm) handle, which drives the devices. [`client`] is the other end, used by
//! `vmm ctl` and by tests. Errors are JSON objects `{"error": "...", "field": "..."}` with a
//! 4xx status for anything the caller can fix; a bad request never affects the guest.

pub mod client;
pub mod http;
mod metrics;
pub mod routes;
pub mod server;

use serde::Serialize;

pub use client::{ApiClient, ClientError};
pub use routes::ROUTES;
pub use server::{ApiServer, ServerError};

use crate::config::json::FieldError;
use crate::device_manager::shm::ShmError;
use crate::memory::MemoryError;
use crate::quiesce::QuiesceError;
use crate::replication::ReplicationError;
use crate::snapshot::SnapshotError;
use crate::swap::{MemorySwapError, SwapError};
use crate::vcpu::ControlError;
use crate::vm::VmError;
use http::Response;

/// The OpenAPI 3.1 description of the API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// An error answer: a status and a JSON body naming what went wrong.
#[derive(Debug, Serialize)]
pub struct ApiError {
    /// The HTTP status: 4xx for what the caller can fix, 5xx otherwise (not in the body).
    #[serde(skip)]
    pub status: u16,
    /// What went wrong, in words.
    pub error: String,
    /// The request field at fault, as a dotted path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// An error with `status` that names no field.
    pub fn new(status: u16, error: impl Into<String>) -> Self {
        Self { status, error: error.into(), field: None }
    }

    /// The response carrying this error: its status, and `{"error": ..., "field": ...}` as body.
    pub fn response(&self) -> Response {
        Response::json(self.status, self)
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self { status: 400, error: e.to_string(), field: e.field }
    }
}

impl From<SwapError> for ApiError {
    fn from(e: SwapError) -> Self {
        let status = match &e {
            SwapError::Invalid(field) => return field.clone().into(),
            SwapError::NoSuchDevice(_) => 404,
            SwapError::Busy { .. } | SwapError::VmExited(_) | SwapError::Replicating => 409,
            SwapError::Incompatible(_) | SwapError::Prepare(_) => 422,
            SwapError::OtherKindOfBackend { setting, .. } => {
                return Self { status: 422, error: e.to_string(), field: Some(format!("backend.{setting}")) };
            }
        };
        let field = matches!(e, SwapError::Incompatible(_) | SwapError::Prepare(_)).then(|| "backend".to_string());
        Self { status, error: e.to_string(), field }
    }
}

impl From<ReplicationError> for ApiError {
    fn from(e: ReplicationError) -> Self {
        let status = match &e {
            ReplicationError::Invalid(field) => return field.clone().into(),
            ReplicationError::Conflict(_) => 409,
            ReplicationError::Unreachable(_) => {
                return Self { status: 422, error: e.to_string(), field: Some("target".into()) };
            }
            // The shadow failed, not the request: this VM runs on.
            ReplicationError::Shadow(_) => 502,
        };
        Self { status, error: e.to_string(), field: None }
    }
}

impl From<MemorySwapError> for ApiError {
    fn from(e: MemorySwapError) -> Self {
        let (status, field) = match &e {
            MemorySwapError::Invalid(field) => return field.clone().into(),
            MemorySwapError::Memory(MemoryError::NoSuchRegion(_)) => (404, None),
            MemorySwapError::Memory(
                MemoryError::File { .. } | MemoryError::HugePages { .. } | MemoryError::Mmap { .. },
            ) => (422, Some("backing")),
            MemorySwapError::Same { .. } | MemorySwapError::Memory(MemoryError::FileNotEmpty { .. }) => {
                (409, Some("backing"))
            }
            MemorySwapError::Pause(ControlError::Stopped)
            | MemorySwapError::StillFilling
            | MemorySwapError::Replicating => (409, None),
            MemorySwapError::Drain { .. } => (503, None),
            _ => (500, None),
        };
        Self { status, error: e.to_string(), field: field.map(String::from) }
    }
}

impl From<ShmError> for ApiError {
    fn from(e: ShmError) -> Self {
        let (status, field) = match &e {
            ShmError::NoWindow(..) => (404, None),
            ShmError::Busy(..) | ShmError::Empty(_) | ShmError::Replicating => (409, None),
            ShmError::PartyTaken { .. } => (409, Some("party")),
            ShmError::Fabric(_) | ShmError::TooBig { .. } => (422, Some("region")),
            ShmError::Map { .. } | ShmError::Kvm { .. } => (500, None),
        };
        Self { status, error: e.to_string(), field: field.map(String::from) }
    }
}

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> Self {
        let (status, field) = match &e {
            SnapshotError::Request { field, .. } => (400, Some(*field)),
            SnapshotError::Directory { .. } => (409, Some("path")),
            SnapshotError::Exited(_)
            | SnapshotError::SwapRunning { .. }
            | SnapshotError::NoParent
            | SnapshotError::Replicating
            | SnapshotError::SharedMemory => (409, None),
            SnapshotError::Quiesce(QuiesceError::Drain { .. }) => (503, None),
            SnapshotError::Quiesce(QuiesceError::Pause(ControlError::Stopped)) => (409, None),
            _ => (500, None),
        };
        Self { status, error: e.to_string(), field: field.map(String::from) }
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let status = match e {
            VmError::Exited(_) | VmError::Control(ControlError::Stopped) => 409,
            VmError::Control(ControlError::NotPaused) | VmError::SwitchedOver => 409,
            VmError::Control(ControlError::Timeout { .. } | ControlError::NoAnswer(_)) => 500,
        };
        Self::new(status, e.to_string())
    }
}
