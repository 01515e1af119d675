//! Placeholder: filled by the converter work.
