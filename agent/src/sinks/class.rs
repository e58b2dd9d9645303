//! What a failed write means for the batch: wait and retry, wait for a
//! person and retry, or give up on this batch and dead-letter it.
//!
//! object_store keeps the HTTP status of an S3 answer in an error type it
//! does not export, so the status and the S3 error code are read from the
//! error's text (`... status code: 400 Bad Request: <Error><Code>...`).

use super::SinkError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// The store is down, slow or throttling: retry with backoff.
    Transient,
    /// Credentials, permissions or the bucket are wrong: retry with backoff,
    /// but a person has to act, so readiness fails and says why.
    Operator(String),
    /// The request itself can never succeed: the batch leaves the queue for
    /// the dead-letter area, with this reason.
    Permanent(String),
}

/// S3 error codes of a 4xx answer that a later attempt may not get.
const TRANSIENT_CODES: [&str; 6] = [
    "SlowDown",
    "RequestTimeout",
    "ExpiredToken",
    "TokenRefreshRequired",
    "RequestTimeTooSkewed",
    "OperationAborted",
];

/// 4xx answers that say who may do what, not what is wrong with the request.
const OPERATOR_CODES: [&str; 5] = [
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "AllAccessDisabled",
];

impl SinkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Write { source, .. } => classify_store_error(source),
            SinkError::Setup { message, .. } => ErrorClass::Operator(shorten(message, 160)),
            SinkError::Conflict { .. } => ErrorClass::Permanent("KeyConflict".into()),
            SinkError::Media { .. } | SinkError::Checkpoint { .. } | SinkError::Timeout { .. } => {
                ErrorClass::Transient
            }
        }
    }
}

fn classify_store_error(e: &object_store::Error) -> ErrorClass {
    use object_store::Error as E;
    let text = e.to_string();
    let code = s3_code(&text);
    match e {
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            ErrorClass::Operator(code.unwrap_or("AccessDenied").to_string())
        }
        // A PUT answered 404 names a bucket that is not there.
        E::NotFound { .. } => ErrorClass::Operator(code.unwrap_or("NoSuchBucket").to_string()),
        E::InvalidPath { .. } => ErrorClass::Permanent("InvalidPath".into()),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            ErrorClass::Permanent("NotSupported".into())
        }
        E::Generic { .. } if credential_failure(&text) => {
            // A request that got no answer or a retryable one is an outage;
            // a refusal, a missing token file or a bad answer needs a person.
            let status = http_status(&text);
            match classify_status(status, code) {
                ErrorClass::Transient if status.is_some() || text.contains("Error performing") => {
                    ErrorClass::Transient
                }
                _ => ErrorClass::Operator("CredentialsUnavailable".into()),
            }
        }
        _ => classify_status(http_status(&text), code),
    }
}

fn classify_status(status: Option<u16>, code: Option<&str>) -> ErrorClass {
    if let Some(code) = code {
        if TRANSIENT_CODES.contains(&code) {
            return ErrorClass::Transient;
        }
        if OPERATOR_CODES.contains(&code) {
            return ErrorClass::Operator(code.to_string());
        }
    }
    match status {
        Some(408 | 429) | None => ErrorClass::Transient,
        Some(s) if (400..500).contains(&s) => {
            ErrorClass::Permanent(code.map_or_else(|| format!("HTTP{s}"), str::to_string))
        }
        Some(_) => ErrorClass::Transient,
    }
}

/// Whether `text` is a failure of object_store's credential chain, not of
/// the write: its status (an instance with no role answers 404, a container
/// endpoint 401) says nothing about the batch. object_store marks the
/// requests of STS and the container endpoint sensitive, so their URL reads
/// `REDACTED`; instance metadata keeps its well-known paths; token files and
/// bad answers have messages of their own.
fn credential_failure(text: &str) -> bool {
    const MARKS: [&str; 7] = [
        "Error performing POST REDACTED",
        "Error performing GET REDACTED",
        "/latest/api/token",
        "/latest/meta-data/iam/",
        "token file '",
        "AssumeRoleWithWebIdentity response",
        "CreateSession",
    ];
    MARKS.iter().any(|mark| text.contains(mark))
}

/// The status of `... status code: 400 Bad Request ...`.
fn http_status(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// The `<Code>` of an S3 XML error body.
fn s3_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    (!code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(code)
}

/// `s` cut to about `max` bytes (on a char boundary) with the cut marked,
/// for keys and messages in logs and dead-letter records.
pub fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_text(status: &str, code: &str) -> String {
        format!(
            "Error performing PUT http://127.0.0.1/b/k in 2ms - Server returned non-2xx status code: {status}: \
             <?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message></Error>"
        )
    }

    fn class_of(status: &str, code: &str) -> ErrorClass {
        let text = status_text(status, code);
        classify_status(http_status(&text), s3_code(&text))
    }

    #[test]
    fn shorten_marks_the_cut() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("ééé", 3), "é...(6 bytes)");
    }

    #[test]
    fn request_errors_are_permanent_with_their_code() {
        for code in [
            "KeyTooLongError",
            "InvalidArgument",
            "EntityTooLarge",
            "InvalidStorageClass",
            "MalformedXML",
        ] {
            assert_eq!(
                class_of("400 Bad Request", code),
                ErrorClass::Permanent(code.into())
            );
        }
        let text = "Server returned non-2xx status code: 411 Length Required: ";
        assert_eq!(
            classify_status(http_status(text), s3_code(text)),
            ErrorClass::Permanent("HTTP411".into())
        );
    }

    #[test]
    fn throttling_timeouts_and_server_errors_are_transient() {
        assert_eq!(
            class_of("503 Service Unavailable", "SlowDown"),
            ErrorClass::Transient
        );
        assert_eq!(
            class_of("500 Internal Server Error", "InternalError"),
            ErrorClass::Transient
        );
        assert_eq!(
            class_of("400 Bad Request", "RequestTimeout"),
            ErrorClass::Transient
        );
        assert_eq!(
            class_of("400 Bad Request", "ExpiredToken"),
            ErrorClass::Transient
        );
        assert_eq!(class_of("429 Too Many Requests", ""), ErrorClass::Transient);
        assert_eq!(
            classify_status(None, None),
            ErrorClass::Transient,
            "no answer at all (connect refused, reset) is transient"
        );
    }

    #[test]
    fn permission_and_bucket_errors_need_an_operator() {
        assert_eq!(
            class_of("400 Bad Request", "InvalidAccessKeyId"),
            ErrorClass::Operator("InvalidAccessKeyId".into())
        );
        let denied = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: status_text("403 Forbidden", "AccessDenied").into(),
        };
        assert_eq!(
            classify_store_error(&denied),
            ErrorClass::Operator("AccessDenied".into())
        );
        let missing = object_store::Error::NotFound {
            path: "k".into(),
            source: status_text("404 Not Found", "NoSuchBucket").into(),
        };
        assert_eq!(
            classify_store_error(&missing),
            ErrorClass::Operator("NoSuchBucket".into())
        );
    }

    #[test]
    fn a_credential_chain_failure_never_dead_letters() {
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        };
        let no_role = "Error performing GET http://169.254.169.254/latest/meta-data/iam/security-credentials/ \
                       in 2ms - Server returned non-2xx status code: 404 Not Found: ";
        let sts = "Error performing POST REDACTED in 9ms - Server returned non-2xx status code: 400 Bad Request: ";
        let token =
            "Failed to read token file '/var/run/token': No such file or directory (os error 2)";
        let down = "Error performing PUT http://169.254.169.254/latest/api/token in 1s - \
                    Server returned non-2xx status code: 503 Service Unavailable: ";
        assert_eq!(classify_store_error(&generic(down)), ErrorClass::Transient);
        for text in [no_role, sts, token] {
            assert_eq!(
                classify_store_error(&generic(text)),
                ErrorClass::Operator("CredentialsUnavailable".into()),
                "{text}"
            );
        }
        let put = status_text("400 Bad Request", "InvalidStorageClass");
        assert_eq!(
            classify_store_error(&generic(&put)),
            ErrorClass::Permanent("InvalidStorageClass".into()),
            "a write the store refuses still dead-letters"
        );
    }
}
