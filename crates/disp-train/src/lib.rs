//! disp-train
