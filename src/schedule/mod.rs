//! Noise schedules and the loops that walk them: the DDIM scheduler ([`ddim`]) and the
//! method-agnostic sampling and inversion loops ([`sampling`]).
pub mod ddim;
pub mod sampling;
