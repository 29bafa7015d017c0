//! The guest side of the project, as seen from the host.
//!
//! The microguest (`guest-agent/microguest`) is a bare-metal program built by this crate's
//! build script; [`MICROGUEST_IMAGE`] is the path of the freshly built ELF and [`microguest`]
//! its bytes, bundled into whatever links this crate (the `vmm demo` command, tests, benches).
//! [`protocol`] holds the constants both sides agree on.

pub use microguest_protocol as protocol;

/// Path of the microguest ELF image built for this workspace.
pub const MICROGUEST_IMAGE: &str = env!("MICROGUEST_IMAGE");

/// The microguest ELF image, embedded at build time.
pub fn microguest() -> &'static [u8] {
    include_bytes!(env!("MICROGUEST_IMAGE"))
}
