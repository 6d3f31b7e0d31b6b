// deepslicing ns-3 cell: per-slice packet sources, per-slice bottleneck links and per-packet
// measurement, all in C++ (compiled at run time by cppyy.cppdef from ns3_gym/engine.py).
//
// One Cell holds num_envs x num_slices SliceLinks. A SliceLink is two ns-3 nodes joined by a
// PointToPoint link (ns3::PointToPointNetDevice + PointToPointChannel) whose transmit DataRate is
// the slice's allocated share x cell capacity, reset every decision interval, and whose device
// queue is an ns3::DropTailQueue<Packet> of `queue_packets` packets. The source writes packets
// straight into the device (NetDevice::Send, protocol 0x0800), the far device's receive callback
// measures the one-way delay. The link is FIFO, so the send times of queued packets are a deque
// (no tags, no per-packet map). Nothing here calls back into Python.
//
// Units: times in ns inside ns-3, delays reported in ms, rates in bit/s, sizes in bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <random>
#include <vector>

#include "ns3/core-module.h"
#include "ns3/network-module.h"
#include "ns3/point-to-point-module.h"

namespace dsns3 {

enum Arrivals { CBR = 0, POISSON = 1, UNIFORM = 2 };

// Per-slice summary columns written by Cell::Collect (keep in step with engine.py COLUMNS).
constexpr int NUM_COLUMNS = 9;

class SliceLink {
  public:
    ns3::Ptr<ns3::PointToPointNetDevice> tx;
    ns3::Ptr<ns3::PointToPointNetDevice> rx;
    uint32_t payload_bytes = 0;  // packet bytes minus the 2-byte PPP header the device adds
    double wire_bits = 0;        // bits on the wire per packet (payload + PPP header)
    int arrivals = CBR;
    std::mt19937_64 rng;
    double rate = 0;      // packets per second this interval (CBR, POISSON)
    int64_t end_ns = 0;   // end of the current interval
    std::deque<int64_t> queued_send_ns;
    ns3::EventId next;
    // counters of the current interval
    uint64_t sent = 0, dropped = 0, received = 0;
    std::vector<double> delays_ms;

    bool Receive(ns3::Ptr<ns3::NetDevice>, ns3::Ptr<const ns3::Packet>, uint16_t,
                 const ns3::Address&) {
        int64_t now = ns3::Simulator::Now().GetNanoSeconds();
        if (!queued_send_ns.empty()) {
            delays_ms.push_back((now - queued_send_ns.front()) * 1e-6);
            queued_send_ns.pop_front();
        }
        ++received;
        return true;
    }

    void Emit() {
        int64_t now = ns3::Simulator::Now().GetNanoSeconds();
        ++sent;
        queued_send_ns.push_back(now);
        if (!tx->Send(ns3::Create<ns3::Packet>(payload_bytes), rx->GetAddress(), 0x0800)) {
            queued_send_ns.pop_back();  // drop-tail: the arriving packet is lost
            ++dropped;
        }
    }

    void EmitAndReschedule() {
        Emit();
        ScheduleNext(ns3::Simulator::Now().GetNanoSeconds());
    }

    void ScheduleNext(int64_t from_ns) {
        double gap_s;
        if (arrivals == POISSON) {
            gap_s = std::exponential_distribution<double>(rate)(rng);
        } else {
            gap_s = 1.0 / rate;
        }
        int64_t at = from_ns + static_cast<int64_t>(std::llround(gap_s * 1e9));
        if (at < end_ns) {
            next = ns3::Simulator::Schedule(
                ns3::NanoSeconds(at - ns3::Simulator::Now().GetNanoSeconds()),
                &SliceLink::EmitAndReschedule, this);
        }
    }

    // Start an interval of `interval_s` seconds: link rate `bps`, `amount` packets per second
    // (CBR, POISSON) or packets in the interval (UNIFORM).
    void Start(double bps, double amount, double interval_s) {
        next.Cancel();
        tx->SetDataRate(ns3::DataRate(static_cast<uint64_t>(std::llround(bps))));
        int64_t now = ns3::Simulator::Now().GetNanoSeconds();
        end_ns = now + static_cast<int64_t>(std::llround(interval_s * 1e9));
        if (arrivals == UNIFORM) {
            uint64_t n = static_cast<uint64_t>(std::llround(amount));
            std::uniform_real_distribution<double> u(0.0, interval_s);
            std::vector<double> at(n);
            for (auto& a : at) a = u(rng);
            std::sort(at.begin(), at.end());
            for (double a : at) {
                ns3::Simulator::Schedule(ns3::NanoSeconds(std::llround(a * 1e9)), &SliceLink::Emit,
                                         this);
            }
            return;
        }
        rate = amount;
        if (rate <= 0) return;
        if (arrivals == CBR) {
            // random phase, so CBR flows of different slices do not align
            double phase = std::uniform_real_distribution<double>(0.0, 1.0 / rate)(rng);
            int64_t first = now + static_cast<int64_t>(std::llround(phase * 1e9));
            if (first < end_ns) {
                next = ns3::Simulator::Schedule(ns3::NanoSeconds(first - now),
                                                &SliceLink::EmitAndReschedule, this);
            }
        } else {
            ScheduleNext(now);
        }
    }

    // Summary of the interval into out[0..NUM_COLUMNS): sent, dropped, received, delivered bits,
    // p95 delay (ms, NaN without deliveries), mean delay, delay std (jitter), max delay, queued.
    void Collect(double* out) {
        out[0] = static_cast<double>(sent);
        out[1] = static_cast<double>(dropped);
        out[2] = static_cast<double>(received);
        out[3] = static_cast<double>(received) * wire_bits;
        size_t n = delays_ms.size();
        if (n == 0) {
            out[4] = out[5] = out[6] = out[7] = NAN;
        } else {
            double sum = 0, sq = 0, mx = 0;
            for (double d : delays_ms) {
                sum += d;
                sq += d * d;
                mx = std::max(mx, d);
            }
            double mean = sum / n;
            // p95 as numpy's default (linear interpolation between order statistics)
            double pos = 0.95 * (n - 1);
            size_t lo = static_cast<size_t>(std::floor(pos));
            std::nth_element(delays_ms.begin(), delays_ms.begin() + lo, delays_ms.end());
            double a = delays_ms[lo];
            double b = a;
            if (lo + 1 < n) b = *std::min_element(delays_ms.begin() + lo + 1, delays_ms.end());
            out[4] = a + (pos - lo) * (b - a);
            out[5] = mean;
            out[6] = std::sqrt(std::max(0.0, sq / n - mean * mean));
            out[7] = mx;
        }
        out[8] = static_cast<double>(queued_send_ns.size());
        sent = dropped = received = 0;
        delays_ms.clear();
    }
};

class Cell {
  public:
    std::vector<SliceLink*> links;

    // `count` links; per link: wire bits per packet, arrival process, RNG seed; all share the
    // propagation delay (ms) and the drop-tail queue limit (packets).
    Cell(int count, const double* packet_bits, const int* arrivals, const uint64_t* seeds,
         double delay_ms, int queue_packets) {
        ns3::PointToPointHelper p2p;
        p2p.SetChannelAttribute("Delay", ns3::TimeValue(ns3::MicroSeconds(
                                             static_cast<int64_t>(std::llround(delay_ms * 1e3)))));
        p2p.SetQueue("ns3::DropTailQueue<Packet>", "MaxSize",
                     ns3::QueueSizeValue(ns3::QueueSize(ns3::QueueSizeUnit::PACKETS,
                                                        static_cast<uint32_t>(queue_packets))));
        for (int i = 0; i < count; ++i) {
            ns3::NodeContainer nodes;
            nodes.Create(2);
            ns3::NetDeviceContainer devices = p2p.Install(nodes);
            auto* link = new SliceLink();
            link->tx = ns3::DynamicCast<ns3::PointToPointNetDevice>(devices.Get(0));
            link->rx = ns3::DynamicCast<ns3::PointToPointNetDevice>(devices.Get(1));
            uint32_t bytes = static_cast<uint32_t>(std::llround(packet_bits[i] / 8.0));
            bytes = std::max<uint32_t>(bytes, 3);
            link->payload_bytes = bytes - 2;
            link->wire_bits = 8.0 * bytes;
            link->arrivals = arrivals[i];
            link->rng.seed(seeds[i]);
            link->rx->SetReceiveCallback(ns3::MakeCallback(&SliceLink::Receive, link));
            links.push_back(link);
        }
    }

    ~Cell() {
        for (auto* link : links) {
            link->next.Cancel();
            delete link;
        }
    }

    // Start one interval on every link, run it, and write NUM_COLUMNS numbers per link to out.
    void RunInterval(const double* bps, const double* amount, double interval_s, double* out) {
        for (size_t i = 0; i < links.size(); ++i) links[i]->Start(bps[i], amount[i], interval_s);
        ns3::Simulator::Stop(ns3::NanoSeconds(std::llround(interval_s * 1e9)));
        ns3::Simulator::Run();
        for (size_t i = 0; i < links.size(); ++i) links[i]->Collect(out + i * NUM_COLUMNS);
    }
};

// The same traffic and rates with no env: `intervals` intervals back to back from the arrays
// bps[intervals][count] and amount[intervals][count]; returns packets received.
inline double RunBare(Cell& cell, int intervals, const double* bps, const double* amount,
                      double interval_s) {
    size_t n = cell.links.size();
    std::vector<double> out(n * NUM_COLUMNS);
    double received = 0;
    for (int t = 0; t < intervals; ++t) {
        cell.RunInterval(bps + t * n, amount + t * n, interval_s, out.data());
        for (size_t i = 0; i < n; ++i) received += out[i * NUM_COLUMNS + 2];
    }
    return received;
}

}  // namespace dsns3
