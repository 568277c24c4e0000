//! The CPU reference backend (filled in by the CPU backend work).
