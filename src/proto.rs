//! Generated protobuf and gRPC code of the API (`proto/`), built by `build.rs`.
//!
//! The modules nest like the protobuf packages (`bbws::instance::v1`,
//! `google::longrunning`) because prost refers to types of other packages by relative
//! paths (`super::super::...::google::longrunning::Operation`); use the flat aliases
//! [`v1`] (= [`bbws_instance_v1`]) and [`google_longrunning`]. `google.rpc` types are
//! tonic-types' (`tonic_types::pb`); well-known types are `prost_types`.

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unreachable_pub,
    rustdoc::all
)]
pub mod bbws {
    //! Package prefix `bbws`.
    pub mod instance {
        //! Package prefix `bbws.instance`.
        pub mod v1 {
            //! `bbws.instance.v1`: the instance manager API.
            tonic::include_proto!("bbws.instance.v1");
        }
    }
}

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unreachable_pub,
    rustdoc::all
)]
pub mod google {
    //! Package prefix `google`.
    pub mod longrunning {
        //! `google.longrunning`: our declaration of the standard Operations interface.
        tonic::include_proto!("google.longrunning");
    }
}

/// The codec of the generated services and clients (`build.rs` names it): prost's, with a
/// first encode buffer of 1 KiB per response instead of tonic's 8 KiB. A server stream keeps
/// its buffer while it is open, and ours carry events of a few hundred bytes: with 10 000
/// WatchOperation streams open that is ~70 MiB less. A larger response grows the buffer as
/// it is encoded.
pub struct Codec<T, U>(std::marker::PhantomData<fn() -> (T, U)>);

/// [`Codec`]'s first encode buffer.
const ENCODE_BUFFER_BYTES: usize = 1024;
/// tonic's default: a stream flushes what it encoded once this much is buffered.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

pub use bbws::instance::v1 as bbws_instance_v1;
pub use bbws::instance::v1;
pub use google::longrunning as google_longrunning;

/// Encoded `FileDescriptorSet` of every file above and of its imports, with source info
/// (comments), for server reflection and for linting. It already contains
/// `google/rpc/status.proto` and the `google/protobuf` files they depend on.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");

/// tonic-types' `google.rpc` descriptor set (Status, ErrorInfo, BadRequest, ...) with its
/// files under their canonical names (`google/rpc/status.proto`,
/// `google/rpc/error_details.proto`), as build.rs fed it to protoc. Register this one with
/// reflection rather than `tonic_types::pb::FILE_DESCRIPTOR_SET`, whose files are named
/// `status.proto` and `error_details.proto`: `google.rpc.Status` would otherwise be
/// described by two different files.
pub const GOOGLE_RPC_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("google_rpc_descriptor_set");
