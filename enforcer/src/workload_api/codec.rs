//! The protobuf codec of the generated server and client (`tonic_prost::ProstCodec`), with a
//! smaller encode buffer: every open stream holds one for its whole life, and the Workload API's
//! messages (an SVID chain, its key and a bundle: about 2 KiB) never need the default 8 KiB.
//! A larger message grows the buffer as it is written.
#![forbid(unsafe_code)]

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The buffer each stream's encoder starts with.
const ENCODE_BUFFER: usize = 2 * 1024;
/// How much encoded output is gathered before it is flushed (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with [`ENCODE_BUFFER`]-sized buffers.
#[derive(Debug)]
pub(crate) struct LeanCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }
}
