//! `disp-core` is the dimension-independent selection layer of DISP-LLM, independent of any
//! model family. A transformer block keeps reading from and writing to a full-width residual
//! stream, but through five index sets of its own: S1 (attention input), S2 (attention output),
//! S3 (MLP input), S4 (MLP intermediate) and S5 (MLP output). This crate holds what every family
//! shares: the sets themselves ([`selection`]: soft/hard gates during search, `index_select` /
//! `index_add` after pruning), the exact parameter accounting and the ratio conventions
//! ([`params`]), the regulariser of the search objective, the serialisable pruning plan
//! ([`plan`]) and the run-time choice of compute device ([`device`]).

pub mod activation_stats;
pub mod device;
pub mod fastmath;
pub mod memory;
pub mod params;
pub mod plan;
pub mod selection;

pub use device::{select_device, DeviceChoice};
pub use params::{BlockShape, BlockWidths, MlpKind, ModelShape, RatioOf};
pub use plan::{LayerIndices, PruningPlan};
pub use selection::{BlockGates, IndexTensors, Selector, Site};

/// Atomic files and staged folders live in the tensor-free `disp-io`; re-exported for callers.
pub use disp_io::fsutil;
