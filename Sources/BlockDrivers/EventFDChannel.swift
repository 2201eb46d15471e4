import NIOCore
import NIOPosix

/// An eventfd watched by an event loop: the channel owns the descriptor,
/// drains its counter when the kernel signals it, and then calls
/// `onSignal` on the loop. How Linux AIO and io_uring completions reach
/// the loop that submitted them without a thread hop.
enum EventFDChannel {
    static func watch(_ fd: Int32, on eventLoop: EventLoop,
                      onSignal: @escaping () -> Void) -> EventLoopFuture<Channel> {
        NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.pipeline.addHandler(SignalHandler(onSignal: onSignal))
            }
            .takingOwnershipOfDescriptor(input: fd)
    }

    private final class SignalHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let onSignal: () -> Void
        init(onSignal: @escaping () -> Void) { self.onSignal = onSignal }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            onSignal()
        }
    }
}
