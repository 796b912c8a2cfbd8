# Builds both binaries; the final images carry one binary each on a
# distroless base. Not built in CI here (no Docker engine on the CI machine);
# the Rust build it runs is the same `cargo build --release` CI exercises.
#
#   docker build --target broker   -t starling-broker .
#   docker build --target operator -t starling-operator .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p starling-broker -p starling-operator \
 && mkdir -p /out \
 && cp target/release/starling-broker target/release/starling-operator /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS broker
COPY --from=build /out/starling-broker /usr/local/bin/starling-broker
# mqtts, https, admin (in-cluster defaults come from the operator's config)
EXPOSE 8883 443 8081
USER nonroot
ENTRYPOINT ["/usr/local/bin/starling-broker"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/starling-operator /usr/local/bin/starling-operator
USER nonroot
ENTRYPOINT ["/usr/local/bin/starling-operator"]
