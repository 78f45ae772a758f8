using System.Diagnostics;

namespace AnyPrecML.Cli;

/// <summary>How every benchmark here times: warm-up, then the median of many passes.</summary>
internal static class BenchTiming
{
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
