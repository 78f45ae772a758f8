using System.Diagnostics;

namespace AnyPrecML.Cli;

/// <summary>How every benchmark here times: warm-up, then the median of many passes.</summary>
internal static class BenchTiming
{
    /// <summary>
    /// Waits until the JIT has compiled nothing for 300 ms (10 s at most). Warm-ups leave the runtime's background
    /// compiler promoting what they ran to optimized code; on a 2-core machine that work would land in whatever is timed
    /// next (the first width measured by `bench engine` ran up to ~20% slow).
    /// </summary>
    public static void SettleJit()
    {
        var deadline = Stopwatch.StartNew();
        long count = System.Runtime.JitInfo.GetCompiledMethodCount();
        while (deadline.Elapsed.TotalSeconds < 10)
        {
            Thread.Sleep(300);
            long now = System.Runtime.JitInfo.GetCompiledMethodCount();
            if (now == count) return;
            count = now;
        }
    }

    /// <summary>Median milliseconds of <paramref name="pass"/> after two warm-up passes, over at least 5 passes or 0.5 s (at most 500).</summary>
    public static double MedianMs(Action pass)
    {
        pass(); pass();
        var times = new List<double>();
        var total = Stopwatch.StartNew();
        while (times.Count < 5 || (total.Elapsed.TotalSeconds < 0.5 && times.Count < 500))
        {
            long start = Stopwatch.GetTimestamp();
            pass();
            times.Add(Stopwatch.GetElapsedTime(start).TotalMilliseconds);
        }
        times.Sort();
        return times[times.Count / 2];
    }
}
