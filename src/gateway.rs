//! Gateway mode (issue 11): an L7 Spark Connect proxy that forwards each RPC as an HTTP/2
//! stream and routes it by the Spark session it belongs to, not by the client's address.
//!
//! This module will hold the HTTP/2 frontend and upstream pools, the session registry with its
//! idle and TTL reaping, and on-demand driver creation. For now it holds only [`decode`]: the
//! bounded decoder that reads the routing key (session id, user id) from the first bytes of a
//! request body, which everything else will be built on.

pub mod decode;
