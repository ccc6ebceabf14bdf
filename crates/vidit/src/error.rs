//! Errors that are the user's to fix (a bad file, key or flag), told apart from internal failures.

/// A problem with what the user supplied. The CLI prints it on one line and exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Returns early with an [`InputError`] built from a format string.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::InputError(format!($($arg)*))))
    };
}

/// Builds an [`InputError`] as an `anyhow::Error`.
pub fn input_error(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(message.into()))
}

/// Whether an error (or anything in its chain) is the user's to fix.
pub fn is_input_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<InputError>().is_some())
}
