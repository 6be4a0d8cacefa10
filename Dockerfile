# One image for every simdevice role (today: the local hub and the service client).
# Build: docker build -t simdevice .
# Run the hub: docker run -p 8883:8883 -p 8443:8443 -v simdevice-hub:/var/lib/simdevice \
#                simdevice hub --bind 0.0.0.0 --state-dir /var/lib/simdevice/hub
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin simdevice

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/simdevice --create-home simdevice
COPY --from=build /src/target/release/simdevice /usr/bin/simdevice
USER simdevice
ENV SIMDEVICE_HUB_STATE_DIR=/var/lib/simdevice/hub
VOLUME ["/var/lib/simdevice"]
EXPOSE 8883 8443
ENTRYPOINT ["/usr/bin/simdevice"]
CMD ["hub", "--bind", "0.0.0.0"]
