//! The Broker's listeners with every default filled in, so the config, the
//! Services, the StatefulSet, the status and the Token URLs agree.

use crate::crd::broker::{BrokerSpec, ListenerSpec};

/// A client listener's name as used in config sections, port names and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Mqtts,
    Https,
    Mqtt,
    Http,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Mqtts, Kind::Https, Kind::Mqtt, Kind::Http];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mqtts => "mqtts",
            Kind::Https => "https",
            Kind::Mqtt => "mqtt",
            Kind::Http => "http",
        }
    }

    /// URL scheme clients use.
    pub fn scheme(self) -> &'static str {
        match self {
            Kind::Mqtts => "mqtts",
            Kind::Https => "https",
            Kind::Mqtt => "mqtt",
            Kind::Http => "http",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, Kind::Mqtts | Kind::Https)
    }

    fn defaults(self) -> (bool, i32) {
        match self {
            Kind::Mqtts => (true, 8883),
            Kind::Https => (true, 443),
            Kind::Mqtt => (false, 1883),
            Kind::Http => (false, 1884),
        }
    }
}

/// Default admin port.
pub const ADMIN_PORT: i32 = 8081;
/// Container port used when the Service port is privileged.
pub const UNPRIVILEGED_HTTPS: i32 = 8443;

/// One listener, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub kind: Kind,
    pub enabled: bool,
    /// Port on the Service.
    pub port: i32,
    /// Port the broker binds in the pod.
    pub container_port: i32,
}

/// All listeners of a Broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// In [`Kind::ALL`] order.
    pub clients: Vec<Listener>,
    pub admin_port: i32,
}

impl Listeners {
    pub fn resolve(spec: &BrokerSpec) -> Listeners {
        let l = &spec.listeners;
        let clients = Kind::ALL
            .iter()
            .map(|&kind| {
                let given = match kind {
                    Kind::Mqtts => l.mqtts.as_ref(),
                    Kind::Https => l.https.as_ref(),
                    Kind::Mqtt => l.mqtt.as_ref(),
                    Kind::Http => l.http.as_ref(),
                };
                resolve_one(kind, given)
            })
            .collect();
        Listeners {
            clients,
            admin_port: l.admin.as_ref().and_then(|a| a.port).unwrap_or(ADMIN_PORT),
        }
    }

    pub fn get(&self, kind: Kind) -> Listener {
        // `clients` always holds every kind; the fallback is unreachable.
        self.clients
            .iter()
            .copied()
            .find(|l| l.kind == kind)
            .unwrap_or(Listener {
                kind,
                enabled: false,
                port: 0,
                container_port: 0,
            })
    }

    pub fn enabled(&self) -> impl Iterator<Item = Listener> + '_ {
        self.clients.iter().copied().filter(|l| l.enabled)
    }

    /// Problems the schema cannot catch: two listeners on one port, or no
    /// client listener at all.
    pub fn validate(&self) -> Result<(), String> {
        let enabled: Vec<Listener> = self.enabled().collect();
        if enabled.is_empty() {
            return Err("no client listener is enabled".into());
        }
        let mut seen: Vec<(i32, &str)> = vec![(self.admin_port, "admin")];
        for l in &enabled {
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == l.container_port) {
                return Err(format!(
                    "listeners {other} and {} both use container port {}",
                    l.kind.name(),
                    l.container_port
                ));
            }
            seen.push((l.container_port, l.kind.name()));
        }
        for (i, a) in enabled.iter().enumerate() {
            if let Some(b) = enabled[i + 1..].iter().find(|b| b.port == a.port) {
                return Err(format!(
                    "listeners {} and {} both use Service port {}",
                    a.kind.name(),
                    b.kind.name(),
                    a.port
                ));
            }
        }
        Ok(())
    }
}

fn resolve_one(kind: Kind, given: Option<&ListenerSpec>) -> Listener {
    let (default_enabled, default_port) = kind.defaults();
    let enabled = given.and_then(|g| g.enabled).unwrap_or(default_enabled);
    let port = given.and_then(|g| g.port).unwrap_or(default_port);
    let container_port = given
        .and_then(|g| g.container_port)
        .unwrap_or(if port < 1024 {
            UNPRIVILEGED_HTTPS
        } else {
            port
        });
    Listener {
        kind,
        enabled,
        port,
        container_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::broker::ListenersSpec;

    #[test]
    fn defaults() {
        let l = Listeners::resolve(&BrokerSpec::default());
        let on: Vec<_> = l
            .enabled()
            .map(|l| (l.kind.name(), l.port, l.container_port))
            .collect();
        assert_eq!(on, vec![("mqtts", 8883, 8883), ("https", 443, 8443)]);
        assert_eq!(l.admin_port, 8081);
        assert_eq!(l.validate(), Ok(()));
    }

    #[test]
    fn clashes_are_reported() {
        let spec = BrokerSpec {
            listeners: ListenersSpec {
                mqtt: Some(ListenerSpec {
                    enabled: Some(true),
                    port: Some(8883),
                    container_port: Some(1883),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = Listeners::resolve(&spec).validate().unwrap_err();
        assert!(err.contains("Service port 8883"), "{err}");

        let spec = BrokerSpec {
            listeners: ListenersSpec {
                mqtt: Some(ListenerSpec {
                    enabled: Some(true),
                    port: Some(1883),
                    container_port: Some(8081),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = Listeners::resolve(&spec).validate().unwrap_err();
        assert!(err.contains("admin and mqtt"), "{err}");

        let off = Some(ListenerSpec {
            enabled: Some(false),
            ..Default::default()
        });
        let spec = BrokerSpec {
            listeners: ListenersSpec {
                mqtts: off.clone(),
                https: off,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(Listeners::resolve(&spec).validate().is_err());
    }
}
