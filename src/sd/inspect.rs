//! Model folder inspection for `diffii info`.
