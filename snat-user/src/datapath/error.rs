//! Why a datapath operation failed: [`DatapathError`], what the layers above match on or show.

/// A failed datapath operation.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A program or map the controller expects is not in the eBPF object it was built with.
    #[error("{0} is missing from the eBPF object")]
    Missing(String),
    /// `--attach tcx` on a kernel without TCX links.
    #[error("--attach tcx needs kernel >= 6.6; use --attach clsact or auto")]
    NoTcx(#[source] Box<DatapathError>),
    /// The XDP program could not be attached in any mode `--ingress` allows (the kernel's reasons).
    #[error("{0}; --ingress tc translates replies without XDP")]
    Xdp(String),
    /// The NAT pool was handed out already.
    #[error("the NAT pool was already taken")]
    PoolTaken,
    /// The release program gave back less than it was given.
    #[error("the release program returned a short batch")]
    ShortBatch,
    /// The forward half of a mapping asked for is not in the table.
    #[error("no mapping for the key")]
    NoMapping,
    /// What was being done, and why the kernel or aya refused it.
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Names what a fallible step was doing: `result.doing(|| format!("attaching {name}"))`.
pub trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, DatapathError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Doing<T> for Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, DatapathError> {
        self.map_err(|e| DatapathError::Failed {
            what: what(),
            source: Box::new(e),
        })
    }
}

/// Plain `?` on the errors of aya and the kernel: the source says what failed.
macro_rules! failed_from {
    ($($t:ty => $what:literal),* $(,)?) => {
        $(impl From<$t> for DatapathError {
            fn from(e: $t) -> Self {
                Self::Failed {
                    what: $what.into(),
                    source: Box::new(e),
                }
            }
        })*
    };
}

failed_from! {
    aya::maps::MapError => "a map operation failed",
    aya::programs::ProgramError => "a program operation failed",
    aya::programs::links::LinkError => "a link operation failed",
    aya::pin::PinError => "pinning failed",
    std::io::Error => "an I/O operation failed",
}

/// The missing program `name`.
pub fn no_program(name: &str) -> DatapathError {
    DatapathError::Missing(format!("program {name}"))
}

/// The missing map `name`.
pub fn no_map(name: &str) -> DatapathError {
    DatapathError::Missing(format!("map {name}"))
}
