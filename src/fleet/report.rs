//! The run report (filled in by issue 9).
