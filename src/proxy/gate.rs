//! The failed-check gate: before forwarding, which quotas a call is held to and what the limiter
//! says; after the answer, the one PURE rule of which answer is which failure
//! ([`settle_for`]), following GitHub's contract for the OAuth Applications API.

use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::classify::Operation;
use crate::limiter::{Admission, Blocked, FailedChecks, FailureClass, Permit, Settle};
use crate::proxy::plan::Call;

/// What the gate decided for one call.
#[derive(Debug)]
pub enum Verdict {
    /// Not held to any quota (no limiter, or not an OAuth Applications call).
    Open,
    /// Let through; settle the permit with the answer.
    Pass(Permit),
    /// Mode `shadow`: would have been answered 429; forwarded anyway.
    WouldLimit(Blocked, Permit),
    /// Answered 429; `true` when it first waited at the gate.
    Limited(Blocked, bool),
}

impl Verdict {
    /// The permit to settle once the upstream answered, if the call holds one.
    pub fn into_permit(self) -> Option<Permit> {
        match self {
            Verdict::Pass(p) | Verdict::WouldLimit(_, p) => Some(p),
            Verdict::Open | Verdict::Limited(..) => None,
        }
    }
}

/// Runs the gate for `call`. Only calls to one app's OAuth Applications API are held (any other
/// is [`Verdict::Open`]): with the credential `authorization` presents (after query credentials
/// were moved there), or the client_id alone, and the client address from `peer` and `headers`.
/// Waits at most until `wait_until` while the call's keys have as many calls in flight as
/// failures left.
pub async fn admit(
    limiter: &Arc<FailedChecks>,
    call: &Call,
    authorization: Option<&HeaderValue>,
    client: IpAddr,
    headers: &HeaderMap,
    wait_until: Instant,
) -> Verdict {
    let Some(client_id) = call.client_id.as_deref() else {
        return Verdict::Open;
    };
    let authorization = authorization.or_else(|| headers.get(header::AUTHORIZATION));
    let keys = limiter.keys(authorization, client_id, client);
    match limiter
        .admit(
            keys,
            call.operation.is_some_and(Operation::has_token),
            wait_until,
        )
        .await
    {
        Admission::Pass(p) => Verdict::Pass(p),
        Admission::WouldLimit(b, p) => Verdict::WouldLimit(b, p),
        Admission::Limited(b, waited) => Verdict::Limited(b, waited),
    }
}

/// What an upstream answer with `status` to `call` means for the quotas:
/// - 401 to any `/applications/{client_id}/...` call: a credential failure (a wrong or missing
///   client secret; GitHub REST: OAuth Applications use Basic authentication with the app's
///   client_id and client_secret);
/// - 404 or 422 to a token operation, legacy or new form, `token/scoped` included: a token
///   failure (GitHub REST: Check a token answers 404 for an invalid token, 422 for a
///   validation failure);
/// - any 2xx: the credential was accepted;
/// - anything else teaches nothing.
pub fn settle_for(call: &Call, status: StatusCode) -> Settle {
    match status {
        StatusCode::UNAUTHORIZED if call.is_app_call() => Settle::Failure(FailureClass::Credential),
        StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY
            if call.operation.is_some_and(Operation::has_token) =>
        {
            Settle::Failure(FailureClass::Token)
        }
        s if s.is_success() && call.is_app_call() => Settle::Accepted,
        _ => Settle::Neutral,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::RouteClass;

    fn call(class: RouteClass, operation: Option<Operation>, app: bool) -> Call {
        Call {
            class,
            operation,
            legacy: None,
            client_id: app.then(|| Box::from("Iv1.a")),
            query_credentials: (false, false),
        }
    }

    #[test]
    fn which_answer_is_which_failure() {
        use FailureClass::{Credential, Token};
        use Settle::{Accepted, Failure, Neutral};
        let legacy_check = call(RouteClass::Legacy, Some(Operation::Check), true);
        let scoped = call(RouteClass::TokenApi, Some(Operation::ScopeToken), true);
        let other_app_call = call(RouteClass::PassThrough, None, true);
        let elsewhere = call(RouteClass::PassThrough, None, false);
        let revoke_all = call(RouteClass::Legacy, Some(Operation::RevokeAll), true);
        let cases: &[(&Call, u16, Settle)] = &[
            (&legacy_check, 200, Accepted),
            (&legacy_check, 204, Accepted),
            (&legacy_check, 401, Failure(Credential)),
            (&legacy_check, 404, Failure(Token)),
            (&legacy_check, 422, Failure(Token)),
            (&legacy_check, 403, Neutral),
            (&legacy_check, 429, Neutral),
            (&legacy_check, 500, Neutral),
            (&legacy_check, 502, Neutral),
            (&scoped, 404, Failure(Token)),
            (&scoped, 422, Failure(Token)),
            (&scoped, 401, Failure(Credential)),
            // Not a token operation: a 404 is no token failure, a 401 still a credential one.
            (&other_app_call, 404, Neutral),
            (&other_app_call, 401, Failure(Credential)),
            (&other_app_call, 200, Accepted),
            // Revoke-all judges no token: its 404 (GitHub removed it) is no token failure.
            (&revoke_all, 404, Neutral),
            (&revoke_all, 401, Failure(Credential)),
            // Not an OAuth Applications call at all: nothing.
            (&elsewhere, 401, Neutral),
            (&elsewhere, 404, Neutral),
            (&elsewhere, 200, Neutral),
        ];
        for (c, status, want) in cases {
            let got = settle_for(c, StatusCode::from_u16(*status).unwrap());
            assert_eq!(got, *want, "{:?} {:?} {status}", c.class, c.operation);
        }
    }
}
