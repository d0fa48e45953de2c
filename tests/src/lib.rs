//! Helpers for the scenario tests.
