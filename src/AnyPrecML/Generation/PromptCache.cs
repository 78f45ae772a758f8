using AnyPrecML.Models;

namespace AnyPrecML.Generation;

/// <summary>
/// Key/value caches of finished generations, kept for the next prompts of one engine at one width: a prompt that starts
/// with tokens a kept cache already holds (the conversation so far in a chat, a shared system prompt) reuses them and
/// prefills only the rest, so a chat's next turn costs its new tokens, not the whole history. <see cref="TextGenerator"/>
/// takes one (<see cref="TextGenerator.PromptCache"/>); the chat client and <c>serve</c> keep one per width.
/// </summary>
/// <remarks>
/// A reused position holds what the generation that wrote it computed: decode steps, or a prompt of
/// <see cref="Kernels.CausalAttention.BlockedTokens"/> or more in the blocked products. A fresh prefill of a long prompt
/// attends in the blocked products' order, so a continuation after a long reused prefix can differ from a fresh run's in
/// the last bits of its attention sums (up to its greedy choice at a near tie). Prompts shorter than that, and a prompt
/// repeated exactly, give bit for bit what a fresh run gives with the CPU engine's int8 kernels (tests hold both).
/// Entries are taken whole: two generations never share one. The least recently used entry goes when more than
/// <see cref="MaxEntries"/> are kept; each holds its cache's memory (capacity × layers × 2 × KV width × 2 bytes in bf16).
/// </remarks>
public sealed class PromptCache
{
    private readonly object _gate = new();
    private readonly List<Entry> _entries = [];
    private long _clock, _hits, _reused;

    /// <summary>A cache keeping up to <paramref name="maxEntries"/> finished generations' key/value caches.</summary>
    public PromptCache(int maxEntries = 4)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxEntries, 1);
        MaxEntries = maxEntries;
    }

    /// <summary>Most caches kept.</summary>
    public int MaxEntries { get; }
    /// <summary>Caches kept now.</summary>
    public int Count { get { lock (_gate) return _entries.Count; } }
    /// <summary>Prompts that reused a kept cache.</summary>
    public long Hits => Interlocked.Read(ref _hits);
    /// <summary>Prompt tokens not prefilled because a kept cache held them.</summary>
    public long ReusedTokens => Interlocked.Read(ref _reused);

    /// <summary>Drops every kept cache.</summary>
    public void Clear()
    {
        lock (_gate) _entries.Clear();
    }

    /// <summary>
    /// The kept cache (removed from the pool) sharing the longest start with <paramref name="prompt"/>'s tokens but its last
    /// (which a generation feeds as a decode step), rolled back to that shared start; null when none shares two tokens or
    /// more (every prompt starts with BOS: one shared token would only take another conversation's cache). A
    /// cache without room for <paramref name="capacity"/> positions (a chat's history outgrowing the last turn's) has its
    /// shared positions copied into a new one from <paramref name="create"/>.
    /// </summary>
    internal (KvCache Cache, int Reused)? Take(ReadOnlySpan<int> prompt, int capacity, Func<int, KvCache> create)
    {
        var usable = prompt[..^1];
        Entry entry;
        int shared = 0;
        lock (_gate)
        {
            int best = -1;
            for (int i = 0; i < _entries.Count; i++)
            {
                int length = usable.CommonPrefixLength(_entries[i].Tokens);
                // Ties go to a cache with room (no copy).
                if (length > shared || (length == shared && best >= 0 && length > 0 && _entries[i].Cache.Capacity >= capacity && _entries[best].Cache.Capacity < capacity))
                    (best, shared) = (i, length);
            }
            if (best < 0 || shared < 2) return null;
            entry = _entries[best];
            _entries.RemoveAt(best);
        }
        var cache = entry.Cache;
        cache.Truncate(shared);
        if (cache.Capacity < capacity)
        {
            var larger = create(capacity);
            cache.CopyTo(larger);
            cache = larger;
        }
        Interlocked.Increment(ref _hits);
        Interlocked.Add(ref _reused, shared);
        return (cache, shared);
    }

    /// <summary>Keeps <paramref name="cache"/>, which holds exactly <paramref name="tokens"/>, for later prompts.</summary>
    internal void Return(KvCache cache, int[] tokens)
    {
        if (cache.Length != tokens.Length) throw new ArgumentException($"the cache holds {cache.Length} positions, not the {tokens.Length} tokens given.", nameof(tokens));
        lock (_gate)
        {
            _entries.Add(new Entry(tokens, cache, ++_clock));
            if (_entries.Count > MaxEntries)
            {
                int oldest = 0;
                for (int i = 1; i < _entries.Count; i++) if (_entries[i].LastUse < _entries[oldest].LastUse) oldest = i;
                _entries.RemoveAt(oldest);
            }
        }
    }

    private sealed record Entry(int[] Tokens, KvCache Cache, long LastUse);
}
