//! Just enough X.509 to read a certificate's expiry: PEM → DER → the
//! `notAfter` of `tbsCertificate.validity`. Used for every certificate
//! source (operator CA, cert-manager, the user's Secret), so status can show
//! the expiry and renewal can be planned without a full X.509 parser.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use starling_model::bundle::parse_rfc3339;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum X509Error {
    #[error("no PEM CERTIFICATE block found")]
    NoPem,
    #[error("PEM block is not valid base64")]
    Base64,
    #[error("certificate DER is malformed: {0}")]
    Der(&'static str),
    #[error("certificate time is malformed")]
    Time,
}

/// The first certificate of a PEM chain, as DER.
pub fn first_der(pem: &str) -> Result<Vec<u8>, X509Error> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN).ok_or(X509Error::NoPem)? + BEGIN.len();
    let len = pem[start..].find(END).ok_or(X509Error::NoPem)?;
    let body: String = pem[start..start + len]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(body).map_err(|_| X509Error::Base64)
}

/// When the first certificate in `pem` expires.
pub fn not_after(pem: &str) -> Result<SystemTime, X509Error> {
    let der = first_der(pem)?;
    let (tag, cert, _) = tlv(&der)?;
    expect(tag, 0x30, "certificate is not a SEQUENCE")?;
    let (tag, tbs, _) = tlv(cert)?;
    expect(tag, 0x30, "tbsCertificate is not a SEQUENCE")?;
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        // [0] EXPLICIT version
        rest = after;
    }
    // serialNumber, signature, issuer
    for what in ["serialNumber", "signature", "issuer"] {
        let (_, _, after) = tlv(rest).map_err(|_| X509Error::Der(what))?;
        rest = after;
    }
    let (tag, validity, _) = tlv(rest)?;
    expect(tag, 0x30, "validity is not a SEQUENCE")?;
    let (_, _, after) = tlv(validity)?; // notBefore
    let (tag, value, _) = tlv(after)?;
    let text = std::str::from_utf8(value).map_err(|_| X509Error::Time)?;
    let rfc3339 = match tag {
        0x17 => utc_time(text)?,
        0x18 => generalized_time(text)?,
        _ => return Err(X509Error::Der("notAfter is not a time")),
    };
    parse_rfc3339(&rfc3339).map_err(|_| X509Error::Time)
}

fn expect(tag: u8, want: u8, what: &'static str) -> Result<(), X509Error> {
    if tag == want {
        Ok(())
    } else {
        Err(X509Error::Der(what))
    }
}

/// One DER tag-length-value: (tag, value, what follows).
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), X509Error> {
    let (&tag, rest) = input.split_first().ok_or(X509Error::Der("truncated"))?;
    let (&first, mut rest) = rest.split_first().ok_or(X509Error::Der("truncated"))?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(X509Error::Der("bad length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(X509Error::Der("truncated"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// `YYMMDDHHMMSSZ` (RFC 5280: YY < 50 is 20YY).
fn utc_time(s: &str) -> Result<String, X509Error> {
    if s.len() != 13 || !s.ends_with('Z') || !s[..12].bytes().all(|b| b.is_ascii_digit()) {
        return Err(X509Error::Time);
    }
    let yy: u32 = s[..2].parse().map_err(|_| X509Error::Time)?;
    let century = if yy < 50 { "20" } else { "19" };
    generalized_time(&format!("{century}{s}"))
}

/// `YYYYMMDDHHMMSSZ`.
fn generalized_time(s: &str) -> Result<String, X509Error> {
    if s.len() != 15 || !s.ends_with('Z') || !s[..14].bytes().all(|b| b.is_ascii_digit()) {
        return Err(X509Error::Time);
    }
    Ok(format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[..4],
        &s[4..6],
        &s[6..8],
        &s[8..10],
        &s[10..12],
        &s[12..14]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_model::bundle::format_rfc3339;

    #[test]
    fn reads_expiry_of_an_rcgen_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let t = not_after(&cert.pem()).unwrap();
        assert_eq!(format_rfc3339(t), "2031-07-04T00:00:00Z");
        // Year 2050 and later use GeneralizedTime.
        params.not_after = rcgen::date_time_ymd(2061, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            format_rfc3339(not_after(&cert.pem()).unwrap()),
            "2061-01-02T00:00:00Z"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(not_after("hello"), Err(X509Error::NoPem));
        let bad = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----";
        assert_eq!(not_after(bad), Err(X509Error::Base64));
        let short = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----";
        assert!(matches!(not_after(short), Err(X509Error::Der(_))));
    }
}
