//! The agent API and the VMM control API of Nutshell.
//!
//! Not implemented yet: the `.proto` files and their generated ttrpc code come with the agent
//! issue. This crate is a placeholder in the workspace so that the layout is in place.
