//! `starling-broker token new`: tokens for standalone brokers, so nobody
//! has to compute a secret hash by hand.

use std::path::Path;

use anyhow::Context;
use starling_model::bundle::{AuthBundle, TokenEntry};
use starling_model::token::{HashKey, generate_secret};

/// Creates a token; see the CLI help for the behaviour.
pub fn new_token(
    name: &str,
    broker: &str,
    bundle_path: Option<&Path>,
    expires_at: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let (mut bundle, existing) = match bundle_path {
        Some(p) if p.exists() => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            (
                AuthBundle::parse(&bytes)
                    .with_context(|| format!("{} is not a valid bundle", p.display()))?,
                true,
            )
        }
        _ => (AuthBundle::new(broker), false),
    };
    if bundle.tokens.iter().any(|t| t.name == name) {
        anyhow::bail!("the bundle already has a token named {name:?}");
    }
    let key = HashKey::from_base64(&bundle.hash_key).context("the bundle's hash_key is invalid")?;
    let secret = generate_secret();
    let mut entry = TokenEntry::new(name, &key, &secret);
    if let Some(t) = expires_at {
        starling_model::bundle::parse_rfc3339(t).with_context(|| format!("--expires-at {t:?}"))?;
        entry.expires_at = Some(t.to_string());
    }
    bundle.tokens.push(entry.clone());
    bundle
        .validate()
        .context("the resulting bundle would be invalid")?;
    let text = bundle.to_json_pretty();
    if let Some(p) = bundle_path {
        // Write beside and rename, so a watching broker never reads half a file.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, p).with_context(|| format!("replacing {}", p.display()))?;
    }
    if json {
        let out = serde_json::json!({
            "name": name,
            "secret": secret,
            "broker": bundle.broker,
            "entry": entry,
            "bundle": bundle_path.map(|p| p.display().to_string()),
        });
        println!("{out}");
        return Ok(());
    }
    println!("token:    {name}");
    println!("secret:   {secret}");
    println!("          (shown once; it is stored only as a hash)");
    println!(
        "connect:  username \"{}\" (or \"{name}\" or \"authorization\"), password = the secret",
        bundle.broker
    );
    match bundle_path {
        Some(p) if existing => println!("added to  {}", p.display()),
        Some(p) => println!("created   {}", p.display()),
        None => {
            println!("bundle (save it and start the broker with --auth-bundle FILE):");
            println!("{text}");
        }
    }
    Ok(())
}
