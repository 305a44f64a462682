// My stream as the socket delivers it: remembers the highest `seq` seen (the
// next connection resumes after it), drops anything already seen, and holds
// frames back until the page has loaded what they apply to.

export class Stream {
  constructor(apply) {
    this.apply = apply;
    this.seq = null; // null until the first hello: a fresh page starts live
    this.held = [];
    this.holding = true;
    this.helloSeen = false;
    this.hello = new Promise((resolve) => {
      this.resolveHello = resolve;
    });
  }

  receive(frame) {
    if (frame.type === "hello") {
      // A fresh page starts at hello's seq (what came before is loaded over
      // HTTP); a reconnection keeps its own, and the replay brings it up to date.
      // A stream shorter than what this page saw means the server started over.
      if (Number.isInteger(frame.seq) && (this.seq === null || frame.seq < this.seq)) this.seq = frame.seq;
      this.helloSeen = true;
      this.resolveHello();
    } else if (Number.isInteger(frame.seq)) {
      if (this.seq !== null && frame.seq <= this.seq) return;
      this.seq = frame.seq;
    }
    if (this.holding) this.held.push(frame);
    else this.apply(frame);
  }

  // From now on frames apply as they come; the held ones first, in order.
  release() {
    this.holding = false;
    for (const frame of this.held.splice(0)) this.apply(frame);
  }
}
